"""Distillation across tokenizers: the alignment of two tokenizations by character offsets on hand-made
and real texts (multi-byte characters, whitespace runs, a word one tokenizer splits and the other does
not), and each loss against its formula written out by hand."""
import json
import math
import re

import numpy as np
import pytest
import torch

from codistill.config import ConfigError, DataConfig
from codistill.crosstok import (align, boundary_positions, chunk_likelihood_loss, offsets, projected_loss,
                                sorted_distribution_loss, spread_map, spread_probs, token_bytes, token_logprobs, vocab_map)
from codistill.data import resolve_tokenizer
from codistill.losses import SoftSpec, Targets, distill_loss, topk_targets


def test_hand_made_alignment_chunks_where_both_end():
    # "unhappy day": student "un|happy| day", teacher "unh|appy|  d|ay" (ends 3,7,10,11 vs 2,7,11)
    got = align([2, 7, 11], [3, 7, 10, 11], 11)
    assert got.chunks == 2 and got.aligned == 1.0
    assert got.student_chunk.tolist() == [0, 0, 1] and got.teacher_chunk.tolist() == [0, 0, 1, 1]
    # byte pieces of one character share its offsets; a token after the last common end is in no chunk
    got = align([1, 2, 2, 5], [2, 4], 5)
    assert got.student_chunk.tolist() == [0, 0, 0, -1] and got.teacher_chunk.tolist() == [0, -1]
    assert got.chunks == 1 and got.aligned == pytest.approx(2 / 5)


@pytest.fixture(scope="module")
def pair():
    return resolve_tokenizer(DataConfig(), None), resolve_tokenizer(DataConfig(tokenizer="gpt2"), None)


@pytest.mark.parametrize("text", [
    "Naïve café-owners  said: «déjà vu» — 東京 is far.",  # multi-byte, a run of spaces, punctuation
    "To be, or not to be: that is the question.\n\n  Whether 'tis nobler",
    "def f(x):\n    return x**2  # squared\n",
])
def test_real_tokenizers_chunks_hold_the_same_characters(pair, text):
    (s_ids, s_ends), (t_ids, t_ends) = (offsets(tok, text, "test") for tok in pair)
    assert len(s_ids) != len(t_ids) or s_ids != t_ids  # they do cut it differently
    got = align(s_ends, t_ends, len(text))
    assert got.chunks > 5 and got.aligned == 1.0
    for c in range(got.chunks):  # every chunk decodes to the same characters on both sides
        s = pair[0].decode([i for i, k in zip(s_ids, got.student_chunk) if k == c])
        t = pair[1].decode([i for i, k in zip(t_ids, got.teacher_chunk) if k == c])
        assert s == t and s, (c, s, t)


def test_one_tokenizer_on_both_sides_makes_one_chunk_per_character_run(pair):
    text = "Naïve café"
    ids, ends = offsets(pair[1], text, "test")
    got = align(ends, ends, len(text))
    assert (got.student_chunk == got.teacher_chunk).all()
    assert got.chunks == len(np.unique(ends))  # byte pieces of one character stay together


def test_a_slow_tokenizer_is_one_line(pair):
    class Slow:
        is_fast = False

    with pytest.raises(ConfigError, match=r"^students\[0\]\.tokenizer: the tokenizer Slow gives no character "
                                          r"offsets \(a slow tokenizer\)"):
        offsets(Slow(), "text", "students[0].tokenizer")


def _chunked(rows, length, chunks_per_row, seed):
    g = torch.Generator().manual_seed(seed)
    chunk = torch.full((rows, length), -1, dtype=torch.long)
    for r in range(rows):
        cuts = sorted(torch.randperm(length - 1, generator=g)[:chunks_per_row - 1].add(1).tolist())
        starts = [0, *cuts]
        for c, (a, b) in enumerate(zip(starts, [*cuts, length])):
            chunk[r, a:b] = c
    return chunk


def test_chunk_likelihood_loss_is_the_binary_kl_of_chunk_probabilities():
    torch.manual_seed(0)
    vs, vt, rows, ls, lt, chunks, temp = 11, 17, 2, 9, 7, 4, 2.0
    zs = torch.randn(rows, ls, vs, requires_grad=True)
    zt = torch.randn(rows, lt, vt)
    ids_s, ids_t = torch.randint(vs, (rows, ls)), torch.randint(vt, (rows, lt))
    cs, ct = _chunked(rows, ls, chunks, 1), _chunked(rows, lt, chunks, 2)
    cs[1, -2:] = -1  # the student's last tokens lie past the last common boundary
    loss, n = chunk_likelihood_loss(zs, ids_s, cs, zt, ids_t, ct, chunks, temp)
    expected, count = 0.0, 0
    for r in range(rows):
        for c in range(1, chunks):  # chunk 0 holds each row's first token, which nothing predicts
            def chunk_logp(z, ids, ch):
                return sum(torch.log_softmax(z[r, i - 1].detach(), -1)[ids[r, i]].item()
                           for i in range(1, z.shape[1]) if ch[r, i] == c)
            if (cs[r] == c).any() and (ct[r] == c).any():
                p_s, p_t = math.exp(chunk_logp(zs, ids_s, cs) / temp), math.exp(chunk_logp(zt, ids_t, ct) / temp)
                expected += temp * (p_t * math.log(p_t / p_s) + (1 - p_t) * math.log((1 - p_t) / (1 - p_s)))
                count += 1
    assert int(n) == count and loss.item() == pytest.approx(expected / count, rel=1e-4)
    loss.backward()
    assert zs.grad.abs().sum() > 0
    same, _ = chunk_likelihood_loss(zs.detach(), ids_s, cs, zs.detach(), ids_s, cs, chunks, temp)
    assert same.item() == pytest.approx(0.0, abs=1e-6)


def test_token_logprobs_are_the_log_softmax_of_the_previous_position():
    z, ids = torch.randn(2, 5, 7), torch.randint(7, (2, 5))
    got = token_logprobs(z, ids, 1.5)
    assert (got[:, 0] == 0).all()
    ref = torch.log_softmax(z[:, :-1] / 1.5, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert torch.allclose(got[:, 1:], ref, atol=1e-6)


def test_sorted_distribution_loss_is_the_l1_of_sorted_probabilities_at_common_boundaries():
    torch.manual_seed(1)
    vs, vt, rows, ls, lt, chunks = 13, 29, 2, 8, 6, 4
    zs, zt = torch.randn(rows, ls, vs, requires_grad=True), torch.randn(rows, lt, vt)
    cs, ct = _chunked(rows, ls, chunks, 3), _chunked(rows, lt, chunks, 4)
    for k in (vt, 5):
        loss, n = sorted_distribution_loss(zs, cs, zt, ct, chunks, k, temperature=1.0)
        expected = []
        for r in range(rows):
            s_last, t_last = boundary_positions(cs, chunks)[r], boundary_positions(ct, chunks)[r]
            for c in range(chunks - 1):  # the last chunk has nothing after it in the row
                ps = torch.sort(zs[r, s_last[c]].detach().softmax(-1), descending=True).values[:k]
                pt = torch.sort(zt[r, t_last[c]].softmax(-1), descending=True).values[:k]
                ps = torch.cat([ps, ps.new_zeros(max(0, len(pt) - len(ps)))])
                pt = torch.cat([pt, pt.new_zeros(max(0, len(ps) - len(pt)))])
                expected.append((ps - pt).abs().sum().item() + abs(pt.sum().item() - ps.sum().item()))
        assert int(n) == len(expected) and loss.item() == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    loss.backward()
    assert zs.grad.abs().sum() > 0


def test_projected_loss_with_one_vocabulary_is_the_soft_term_and_adds_what_maps_to_one_token():
    torch.manual_seed(2)
    rows, length, v = 2, 7, 11
    zs, zt = torch.randn(rows, length, v, requires_grad=True), torch.randn(rows, length, v)
    chunk = torch.arange(length).expand(rows, length)  # one tokenization: every token a chunk of its own
    n_rows = rows * (length - 1)  # the last position has no next chunk to predict
    ones, zeros = torch.ones(n_rows, dtype=torch.bool), torch.zeros(n_rows, dtype=torch.long)
    for divergence, temperature, k in (("forward_kl", 1.0, None), ("reverse_kl", 2.0, None), ("jsd", 1.0, 4)):
        loss, n = projected_loss(zs, chunk, zt, chunk, length, torch.arange(v), SoftSpec(divergence), temperature, k)
        teacher = zt[:, :-1].reshape(-1, v)
        targets = Targets(temperature, logits=teacher) if k is None else topk_targets(teacher, k, temperature)
        ref = distill_loss(zs[:, :-1].reshape(-1, v), zeros, ones, targets, SoftSpec(divergence, alpha=1.0))
        assert int(n) == n_rows and loss.item() == pytest.approx(ref.loss.item(), rel=1e-4)
        spread, _ = projected_loss(zs, chunk, zt, chunk, length, torch.arange(v), SoftSpec(divergence), temperature,
                                   k, groups=spread_map(torch.arange(v), torch.arange(v)))  # one vocabulary: the same
        assert spread.item() == pytest.approx(ref.loss.item(), rel=1e-4)
    # a teacher of 13 tokens whose last three begin with the student's token 0: their probabilities add up there
    zt = torch.randn(rows, length, v + 2)
    mapping = torch.cat([torch.arange(v), torch.zeros(2, dtype=torch.long)])
    loss, _ = projected_loss(zs, chunk, zt, chunk, length, mapping, SoftSpec("forward_kl"))
    p = zt[:, :-1].reshape(-1, v + 2).softmax(-1)
    q = torch.cat([p[:, :1] + p[:, v:].sum(-1, keepdim=True), p[:, 1:v]], dim=1)
    log_ps = zs[:, :-1].reshape(-1, v).log_softmax(-1)
    assert loss.item() == pytest.approx((q * (q.log() - log_ps)).sum(-1).mean().item(), rel=1e-4)
    loss.backward()
    assert zs.grad[:, -1].abs().sum() == 0 and zs.grad[:, :-1].abs().sum() > 0


def test_spread_shares_each_teacher_tokens_probability_among_its_student_tokens_by_their_probabilities():
    torch.manual_seed(3)
    v_t, v_s, n = 6, 9, 4
    p, own = torch.randn(n, v_t).softmax(-1), torch.randn(n, v_s).softmax(-1)
    mapping = torch.tensor([0, 1, 2, 7, 4, 4])  # teacher token 5's text begins with the student's token 4,
    # teacher token 3's with student token 7, which is in teacher token 2's group: it is in both
    back = torch.tensor([0, 1, 2, 3, 4, 0, 0, 2, 1])  # student tokens 5-8 are longer: "\n" + indentation, say
    q = spread_probs(p.clone(), own, spread_map(mapping, back))
    expected = torch.zeros(n, v_s)
    for t in range(v_t):
        members = sorted({s for s in range(v_s) if int(back[s]) == t} | {int(mapping[t])})
        weights = own[:, members] / own[:, members].sum(-1, keepdim=True)
        expected[:, members] += p[:, t:t + 1] * weights
    torch.testing.assert_close(q, expected)
    torch.testing.assert_close(q.sum(-1), torch.ones(n))  # every teacher token's probability lands, once
    same = torch.arange(v_t)  # one vocabulary: the plain distribution
    torch.testing.assert_close(spread_probs(p.clone(), torch.randn(n, v_t).softmax(-1), spread_map(same, same)), p)
    own[:, [0, 5, 6]] = 0  # a teacher token whose student tokens all have probability 0: its map keeps it
    torch.testing.assert_close(spread_probs(p.clone(), own, spread_map(mapping, back))[:, 0], p[:, 0])


def test_spread_gives_the_teachers_newline_to_the_students_newline_and_indentation(pair):
    student, teacher = pair
    mapping, back = vocab_map(teacher, student), vocab_map(student, teacher)
    newline, indented = teacher.convert_tokens_to_ids("Ċ"), student("\n" + " " * 8 + "x")["input_ids"][0]
    assert student.convert_ids_to_tokens(indented).startswith("ĊĠĠĠĠ") and int(back[indented]) == newline
    p = torch.zeros(1, len(teacher))
    p[0, newline] = 1.0
    own = torch.full((1, len(student)), 1e-6)
    own[0, indented] = 1.0  # the student writes a newline before indented code as one token
    q = spread_probs(p, own / own.sum(), spread_map(mapping, back))
    assert q[0, indented] > 0.99 and q[0, mapping[newline]] < 0.01  # where a plain projection puts it all


def test_the_vocabulary_map_gives_each_teacher_token_the_students_first_token_of_its_text(pair):
    student, teacher = pair
    assert torch.equal(vocab_map(student, student), torch.arange(len(student)))  # bytes of one character included
    mapping = vocab_map(teacher, student)
    assert mapping.shape == (len(teacher),) and int(mapping.max()) < len(student)
    for text in (" the", " Elsinore", "\n\n", " café"):
        first_t = teacher(text, add_special_tokens=False)["input_ids"][0]
        first_s = student(teacher.decode([first_t]), add_special_tokens=False)["input_ids"][0]
        assert int(mapping[first_t]) == first_s
    assert int(mapping[teacher.eos_token_id]) == student.eos_token_id


@pytest.fixture(scope="module")
def llama_style():
    """A tokenizer of SentencePiece's kind (Llama 2, Mistral): "▁" for a space and at the text's start, bytes
    of unknown characters as <0xHH> tokens, a decoder that strips the first space (a lone "▁the" reads "the")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *"▁abcdefghilmnopqrstuvwyTEW',.:\n"]
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("o", "r"), ("▁", "E"), ("\n", "\n")]
    vocab = {t: i for i, t in enumerate(pieces + [a + b for a, b in merges])}
    tok = Tokenizer(models.BPE(vocab, merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def llama_with_start(llama_style):
    """The same tokenizer putting <s> before every text of its own accord, as Llama's and Mistral's do."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(llama_style.backend_tokenizer.to_str())  # a copy: the fixture's stays as it is
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_each_document_starts_as_the_teacher_read_its_pretraining_text(pair, llama_with_start):
    """A tokenizer that puts <s> before a text gets it at every document's start, in the chunk of the first
    characters (the other side has no start token); one without (GPT-2's) gets none."""
    from codistill.crosstok import PAIRED, pair_blocks, start_tokens

    student, bos = pair[0], llama_with_start.bos_token_id
    assert start_tokens(llama_with_start) == [bos] and start_tokens(student) == start_tokens(pair[1]) == []
    out = pair_blocks(DOCS, student, llama_with_start, seq_len=24)
    starts = 0
    for row in range(len(out["input_ids"])):
        t_ids, t_chunk = out["teacher_input_ids"][row], out["teacher_chunk"][row]
        for k, i in enumerate(t_ids):
            if i == bos:
                starts += 1
                assert k == 0 or t_ids[k - 1] == llama_with_start.eos_token_id  # right after a document's end
                assert t_chunk[k] == t_chunk[k + 1] and t_chunk[k] >= 0  # with the first characters
        assert bos not in out["input_ids"][row] and all(out["loss_mask"][row][:sum(out["attention_mask"][row])])
        # the teacher reads its start token and is not scored on it (as the students' side below)
        assert [m for i, m, a in zip(t_ids, out["teacher_loss_mask"][row], out["teacher_attention_mask"][row])
                if a] == [int(i != bos) for i, a in zip(t_ids, out["teacher_attention_mask"][row]) if a]
    assert starts == len(DOCS)
    from codistill.crosstok import CROSS
    from codistill.data import on_device

    batch = on_device({k: torch.tensor(v) for k, v in out.items() if k in PAIRED}, torch.device("cpu"))
    predicts_start = batch[CROSS + "labels"] == bos
    assert predicts_start.any() and not batch[CROSS + "mask"][predicts_start].any()
    swapped = pair_blocks(DOCS, llama_with_start, student, seq_len=24)  # a student's start: read, not scored
    for ids, mask, attended in zip(swapped["input_ids"], swapped["loss_mask"], swapped["attention_mask"]):
        assert all(m == int(i != bos) for i, m, a in zip(ids, mask, attended) if a)
    assert sum(i == bos for ids in swapped["input_ids"] for i in ids) == len(DOCS)


@pytest.mark.parametrize("pack", [True, False])
def test_one_tokenizer_with_a_start_token_starts_every_document_too(llama_with_start, pack):
    import datasets

    from codistill.data import _to_blocks

    texts, bos = ["the tea", "a hat", "the end"], llama_with_start.bos_token_id
    blocks = _to_blocks(datasets.Dataset.from_dict({"text": texts}), DataConfig(seq_len=8, pack=pack),
                        llama_with_start)
    ids = [i for row, a in zip(blocks["input_ids"], blocks["attention_mask"]) for i, x in zip(row, a) if x]
    scored = [m for row, a in zip(blocks["loss_mask"], blocks["attention_mask"]) for m, x in zip(row, a) if x]
    eos = llama_with_start.eos_token_id
    assert ids[0] == bos and all(m == int(i != bos) for i, m in zip(ids, scored))
    assert all(ids[k - 1] == eos for k, i in enumerate(ids) if i == bos and k and pack)  # each after an end
    assert ids.count(bos) == (ids.count(eos) + (ids[-1] != eos) if pack else len(texts))
    if not pack:  # one document a row, its start first
        assert [row[0] for row in blocks["input_ids"]] == [bos] * len(texts)


def test_the_vocabulary_map_reads_sentencepiece_spaces_and_byte_fallback(pair, llama_style):
    student, sp = pair[0], llama_style
    assert sp.decode(sp.convert_tokens_to_ids(["▁the"])) == "the"  # what a map by lone decodes would read

    def first(tok, text):
        return tok(text, add_special_tokens=False)["input_ids"][0]

    spelled, ids = token_bytes(sp), sp.convert_tokens_to_ids
    assert spelled[ids("▁the")] == b" the" and spelled[ids("<0xC3>")] == b"\xc3"
    forward, back = vocab_map(sp, student), vocab_map(student, sp)
    for piece, text in (("▁the", " the"), ("he", "he"), ("▁", " "), ("\n\n", "\n\n"), ("<0xC3>", "é")):
        assert int(forward[ids(piece)]) == first(student, text), piece
    for piece, text in (("Ġthe", "▁the"), ("the", "t"), ("Ã", "<0xC3>"), ("ĊĊ", "\n\n")):  # mid-word: no "▁"
        assert int(back[student.convert_tokens_to_ids(piece)]) == ids(text), piece
    assert int(forward[sp.eos_token_id]) == student.eos_token_id and int(back[student.eos_token_id]) == sp.eos_token_id
    own = vocab_map(sp, sp)  # onto itself, but for <unk>, <s>, and bytes of a character it has a piece for
    assert torch.equal(own[259:], torch.arange(259, len(sp)))
    assert int(own[ids("<0x0A>")]) == ids("\n") and int(own[ids("<0xE6>")]) == ids("<0xE6>")


def test_a_sentencepiece_teacher_pairs_the_same_bytes_chunk_by_chunk(pair, llama_style):
    from codistill.crosstok import pair_blocks

    student, spelled_s, spelled_t = pair[0], token_bytes(pair[0]), token_bytes(llama_style)
    out = pair_blocks(DOCS, student, llama_style, seq_len=24)
    joined, opened = [], 0
    for row in range(len(out["input_ids"])):
        s_ids, t_ids = out["input_ids"][row], out["teacher_input_ids"][row]
        s_chunk, t_chunk = out["student_chunk"][row], out["teacher_chunk"][row]
        for c in range(max(s_chunk) + 1):
            s = b"".join(spelled_s[i] or b"|" for i, k in zip(s_ids, s_chunk) if k == c)
            t = b"".join(spelled_t[i] or b"|" for i, k in zip(t_ids, t_chunk) if k == c)
            opened += t == b" " + s  # the "▁" it opens each document with, as a Llama reads it
            assert s == t or t == b" " + s, (row, c, s, t)
            joined.append(s)
    assert opened == len(DOCS)
    assert b"".join(joined).replace(b"|", b"") == "".join(DOCS).encode()  # "東京" and "«" by byte fallback


def test_boundary_positions_are_each_chunks_last_token():
    chunk = torch.tensor([[0, 0, 1, 2, 2, -1]])
    assert boundary_positions(chunk, 4).tolist() == [[1, 2, 4, -1]]


DOCS = ["Naïve café-owners  said: «déjà vu».", "To be, or not to be: that is the question.\n\nWhether 'tis nobler "
        "in the mind to suffer the slings and arrows of outrageous fortune", "東京 is far; x**2  # squared", "Ay."]


def test_paired_blocks_hold_the_same_text_on_both_sides_and_all_of_it(pair):
    from codistill.crosstok import PAIRED, STATS, pair_blocks

    student, teacher = pair
    out = pair_blocks(DOCS, student, teacher, seq_len=16)
    assert set(out) == {*PAIRED, *STATS} and sum(out["dropped_tokens"]) == 0 and sum(out["tokenize_s"]) > 0
    assert len(out["input_ids"]) > 4
    texts = []
    for row in range(len(out["input_ids"])):
        s_len, t_len = sum(out["attention_mask"][row]), sum(out["teacher_attention_mask"][row])
        assert max(s_len, t_len) <= 16 and all(len(out[c][row]) == 16 for c in PAIRED)
        s_ids, t_ids = out["input_ids"][row][:s_len], out["teacher_input_ids"][row][:t_len]
        s_chunk, t_chunk = out["student_chunk"][row], out["teacher_chunk"][row]
        assert s_chunk[s_len:] == [-1] * (16 - s_len) and s_chunk[0] == t_chunk[0] == 0
        assert max(s_chunk) == max(t_chunk)  # a block ends where both end a chunk
        for c in range(max(s_chunk) + 1):  # chunk by chunk, and so the block, the same characters
            s = student.decode([i for i, k in zip(s_ids, s_chunk) if k == c])
            t = teacher.decode([i for i, k in zip(t_ids, t_chunk) if k == c])
            assert s == t or {s, t} == {student.eos_token, teacher.eos_token}, (row, c, s, t)
        texts.append(student.decode(s_ids))
    # every block in order gives back every document, each closed by the end-of-text
    assert "".join(texts) == "".join(d + student.eos_token for d in DOCS)


class Cut:
    """A stand-in fast tokenizer cutting the text every ``step`` characters."""

    is_fast, pad_token_id, eos_token_id, unk_token_id = True, 0, 1, None

    def __init__(self, step):
        self.step = step

    def __call__(self, text, **_):
        ends = list(range(self.step, len(text), self.step)) + [len(text)]
        return {"input_ids": [2] * len(ends), "offset_mapping": [(e - self.step, e) for e in ends]}


def test_a_chunk_longer_than_a_block_is_left_out_and_counted():
    from codistill.crosstok import pair_blocks

    # cut every 2 and every 3 characters: they end together every 6 characters and at each end-of-text
    out = pair_blocks(["aaaaaa", "bbbbbbbbbbbb"], Cut(2), Cut(3), seq_len=2)
    lengths = [sum(m) for m in out["attention_mask"]]
    teacher = [sum(m) for m in out["teacher_attention_mask"]]
    assert all(s <= 2 for s in lengths) and all(t <= 2 for t in teacher)
    # each 6-character run is one chunk of 3 student tokens: longer than a block of 2, so left out
    assert out["input_ids"] == [[1, 0]] * 2 and sum(out["dropped_tokens"]) == 3 + 6


def test_a_longer_teacher_side_fills_the_students_side():
    """A teacher whose tokenizer needs twice the tokens: with blocks of 4 on both sides the students' side holds
    2 (the teacher's fills first); with data.teacher_seq_len 8 both sides are full."""
    from codistill.crosstok import PAIRED, pair_blocks

    docs = ["a" * 16]
    short = pair_blocks(docs, Cut(2), Cut(1), seq_len=4)
    assert [sum(m) for m in short["attention_mask"]][:4] == [2, 2, 2, 2]
    full = pair_blocks(docs, Cut(2), Cut(1), seq_len=4, teacher_len=8)
    assert [sum(m) for m in full["attention_mask"]] == [4, 4, 1] and sum(full["student_tokens"]) == 9
    assert [sum(m) for m in full["teacher_attention_mask"]] == [8, 8, 1] and sum(full["teacher_tokens"]) == 17
    for column in PAIRED:
        assert {len(row) for row in full[column]} == {8 if column.startswith("teacher") else 4}, column


def test_a_further_students_side_is_cut_where_every_side_ends_and_keeps_its_own_chunks():
    """Three tokenizations (every 2, 1 and 3 characters): blocks end only where all three end a token (every 6
    characters, and the end-of-text), so every side holds the same characters; inside a block each students' side
    keeps its chunks against the teacher's tokens (boundaries every 2 characters for the first side, every 3 for
    the further one), and the teacher's columns are written once."""
    from codistill.crosstok import PAIRED, pair_blocks, side_columns, side_prefix

    out = pair_blocks(["a" * 12], Cut(2), Cut(1), seq_len=4, teacher_len=8, others=[Cut(3)])
    assert set(side_columns(side_prefix(1))) == {"s1_input_ids", "s1_attention_mask", "s1_loss_mask",
                                                 "s1_student_chunk", "s1_teacher_chunk"}
    assert all(len(out[c]) == 2 for c in (*PAIRED, *side_columns("s1_")))  # the end-of-text joins the second
    held = {c: [sum(m) for m in out[c]] for c in ("attention_mask", "teacher_attention_mask", "s1_attention_mask")}
    assert held == {"attention_mask": [3, 4], "teacher_attention_mask": [6, 7], "s1_attention_mask": [2, 3]}
    assert out["student_chunk"] == [[0, 1, 2, -1], [0, 1, 2, 3]]
    assert out["teacher_chunk"] == [[0, 0, 1, 1, 2, 2, -1, -1], [0, 0, 1, 1, 2, 2, 3, -1]]
    assert out["s1_student_chunk"] == [[0, 1, -1, -1], [0, 1, 2, -1]]
    assert out["s1_teacher_chunk"] == [[0, 0, 0, 1, 1, 1, -1, -1], [0, 0, 0, 1, 1, 1, 2, -1]]
    assert out["s1_input_ids"][1] == [2, 2, 1, 0]  # its own end-of-text, then padding
    # with no further side, the blocks are those of two tokenizers (the same columns, the same values)
    two = pair_blocks(["a" * 12], Cut(2), Cut(1), seq_len=4, teacher_len=8)
    assert {c: two[c] for c in PAIRED} != {c: out[c] for c in PAIRED}  # (the third side cuts them coarser)
    assert set(two) == {c for c in out if not c.startswith("s1_")}


# ------------------------------------------------------------------ runs with a teacher of another tokenizer

CROSS_RUN = ["train.max_steps=4", "distill.benefit_interval=2", "train.eval_interval=2", "distill.burn_in_steps=0",
             "distill.warmup_steps=1"]


OTHER_VOCAB = 512  # the runs' teacher tokenizer: a byte-level BPE of another size, trained on other text
THIRD_VOCAB = 384  # a second student's own tokenizer in the two-rank run
MICRO_MODEL = ("config: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, "
               "num_key_value_heads: 2, max_position_embeddings: 64}, deepspeed: {zero_optimization: {stage: 2}, "
               "optimizer: {type: AdamW, params: {lr: 3.0e-3}}, gradient_clipping: 1.0}")


@pytest.fixture(scope="module")
def cross_setup(tmp_path_factory):
    """A small corpus (the bundled one's first play, speech by speech) and, in a folder, the teacher's own
    tokenizer: a 512-token BPE trained on another play (the GPT-2 one makes the same runs slower)."""
    import json

    from codistill.data import prepare_corpus, train_bpe_tokenizer

    folder = tmp_path_factory.mktemp("cross")
    root = prepare_corpus("shakespeare", DataConfig().resolved_cache_dir())
    plays = [json.loads(x)["text"] for x in (root / "train.jsonl").read_text().splitlines()[:2]]
    speeches = [s for s in plays[0][:120_000].split("\n\n") if s.strip()]  # ~2,000 documents: a quick build
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in speeches))
    train_bpe_tokenizer([plays[1]], OTHER_VOCAB).save_pretrained(folder / "other")
    train_bpe_tokenizer([plays[0][120_000:]], THIRD_VOCAB).save_pretrained(folder / "third")  # a student's own
    return [f"data.dataset={folder / 'docs.jsonl'}", f"data.tokenizer={root / 'tokenizer'}",
            f"data.cache_dir={folder / 'cache'}", f"teacher.tokenizer={folder / 'other'}", *CROSS_RUN]


def third_tokenizer(cross_setup) -> str:
    """The folder of the cross runs' third tokenizer (a student's own), beside the teacher's."""
    from pathlib import Path

    return str(Path(next(x for x in cross_setup if x.startswith("teacher.tokenizer=")).split("=", 1)[1]).parent / "third")


def test_an_auto_teacher_side_fills_the_students_side_and_is_written_resolved(tmp_path, cross_setup, capsys):
    """data.teacher_seq_len=auto: data.seq_len x the teacher's tokens per student token, measured on the first
    training documents; the students' side of the paired blocks is then about full, where with the teacher's side
    at data.seq_len it ends where the teacher's fills. The resolved number is what the run's config keeps."""
    import re

    from codistill.config import dump_config, load_config
    from codistill.data import build_splits, run_tokenizer, teacher_tokenizer

    from conftest import MICRO

    cfg = load_config(MICRO, [*cross_setup, "data.teacher_seq_len=auto", f"output_dir={tmp_path / 'run'}"])
    run = run_tokenizer(cfg)
    own = teacher_tokenizer(cfg, run)
    said = re.search(r"data.teacher_seq_len auto: (\d+) \(data.seq_len 32 x ([\d.]+) teacher tokens per student "
                     r"token on 256 training documents, [\d,]+ characters\)", capsys.readouterr().out)
    assert said and int(said.group(1)) == cfg.data.teacher_seq_len > 32, said
    assert abs(cfg.data.teacher_seq_len - 32 * float(said.group(2))) <= 1
    assert f"teacher_seq_len: {cfg.data.teacher_seq_len}" in dump_config(cfg)
    fill = {}
    for side in ("auto", None):
        c = cfg if side else load_config(MICRO, [*cross_setup, f"output_dir={tmp_path / 'run'}"])
        train = build_splits(c.data, run, c.train.seed, None, own).train
        fill[side] = float(train[:]["attention_mask"].float().sum(1).mean())
    assert fill["auto"] >= 0.85 * 32 and fill["auto"] > fill[None] + 2, fill


def test_a_two_rank_codistillation_across_tokenizers_logs_its_tags_and_resumes_exactly(tmp_path, cross_setup):
    """A teacher with its own tokenizer and two students, one reading the run's tokenizer and one its own (a
    further side of the paired blocks): every model's tags, the restart, the export with each one's tokenizer."""
    from conftest import after, launch, read_scalars, resumed_beside

    straight, split = tmp_path / "straight", tmp_path / "split"
    third = third_tokenizer(cross_setup)
    cross_setup = [*cross_setup, "data.teacher_seq_len=40",  # the teacher's side longer than the students' 32
                   f"students=[{{name: student, {MICRO_MODEL}}}, {{name: other, tokenizer: {third}, {MICRO_MODEL}}}]"]
    log = launch(f"output_dir={straight}", *cross_setup, "checkpoint.interval=2", "train.samples=1",
                 "train.sample_tokens=4").stdout
    for name in ("teacher", "student", "other"):  # each writes in its own tokenizer, from the same prompt's text
        assert re.search(rf"sample at step 4, {name}: .+ -> ", log), name
    assert "teacher: 147,776 parameters" in log and f"its own tokenizer ({OTHER_VOCAB} tokens), aligned" in log
    assert "other: 34,912 parameters" in log and f"its own tokenizer ({THIRD_VOCAB} tokens), aligned" in log
    assert "across tokenizers by spread distributions (forward_kl, full)" in log  # the default
    assert re.search(r"; further students' side 1 \d+ of 32", log)
    resumed = resumed_beside(straight, 2, split, *cross_setup).stdout
    assert "step_00000002 at step 2" in resumed
    a, b = read_scalars(straight), read_scalars(split)
    for tag in ("teacher/train/loss", "teacher/cross/loss_ce", "teacher/cross/s1/loss_ce", "student/train/loss",
                "student/train/loss_kd", "student/train/aligned_share", "other/train/loss", "other/train/loss_kd",
                "other/train/aligned_share", "other/cross/loss_ce", "schedule/alpha/student", "schedule/alpha/other",
                "benefit/openness/student", "benefit/openness/other"):
        assert sorted(a[tag]) == [1, 2, 3, 4] and all(map(math.isfinite, a[tag].values())), tag
        assert after(a, 2)[tag] == b[tag], tag  # the same batches, targets and steps after the restart
    for name in ("student", "other"):
        assert 0 < min(a[f"{name}/train/aligned_share"].values()) <= 1
        # the benefit gate measures the projected term's hypergradient, alike after the restart
        signal = a[f"benefit/signal/{name}"]
        assert sorted(signal) == [1, 3] and after(a, 2)[f"benefit/signal/{name}"] == b[f"benefit/signal/{name}"]
        assert all(map(math.isfinite, signal.values()))
        assert max(a[f"schedule/alpha/{name}"].values()) > 0 and max(a[f"{name}/train/loss_kd"].values()) > 0
    # the teacher's CE per token of each students' side: the same text, so the side with fewer tokens reads higher
    assert a["teacher/cross/s1/loss_ce"] != a["teacher/cross/loss_ce"]
    for tag in ("teacher/eval/loss", "teacher/eval/loss_aligned", "student/eval/loss", "other/eval/loss",
                "other/eval/loss_aligned"):
        assert sorted(a[tag]) == [0, 2, 4] and after(a, 2)[tag] == b[tag], tag
    # the teacher's CE per token of its own tokenization, and per token of the students' (same text, fewer tokens)
    assert a["teacher/eval/loss_aligned"][4] != a["teacher/eval/loss"][4]
    assert "student/eval/agreement" not in a  # top-1 tokens of two vocabularies do not compare
    # each model is exported with the tokenizer it read
    from transformers import AutoTokenizer

    from codistill.checkpoint import export_checkpoint, intact

    folders = export_checkpoint(intact(straight), tmp_path / "hf", ["teacher", "student", "other"])
    assert [len(AutoTokenizer.from_pretrained(str(f))) for f in folders] == [OTHER_VOCAB, 4096, THIRD_VOCAB]


@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory, cross_setup):
    """A small pretrained folder that holds its own tokenizer (the runs' other one)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from codistill.data import load_tokenizer

    tok = load_tokenizer(next(x for x in cross_setup if x.startswith("teacher.tokenizer=")).split("=", 1)[1])
    folder = tmp_path_factory.mktemp("other_teacher") / "teacher"
    hf = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                              max_position_embeddings=64)
    torch.manual_seed(4)
    AutoModelForCausalLM.from_config(hf).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _fit(overrides, capsys):
    """A run in the test process: its opening lines and its TensorBoard scalars."""
    from conftest import read_scalars, train_here

    capsys.readouterr()
    train_here(*overrides)
    out = next(x for x in overrides if x.startswith("output_dir=")).split("=", 1)[1]
    return capsys.readouterr().out, read_scalars(out)


@pytest.mark.parametrize("method,line,side", [("sorted", "sorted distributions (top 8 ranks)", 24),
                                              ("spread", "spread distributions (forward_kl, top-8)", 48)])
def test_a_frozen_teacher_of_another_tokenizer_teaches_in_soft_mode(tmp_path, cross_setup, other_teacher, capsys,
                                                                    method, line, side):
    """A pretrained teacher folder that holds its own tokenizer: no teacher.tokenizer needed; its side of the
    blocks as long as the students' or longer (data.teacher_seq_len)."""
    setup = [x for x in cross_setup if not x.startswith("teacher.tokenizer=")]
    log, tb = _fit([f"output_dir={tmp_path / 'run'}", *setup, "mode=soft", f"teacher.pretrained={other_teacher}",
                    "teacher.config={}", "teacher.deepspeed=configs/ds/zero3_cpu.json", f"data.teacher_seq_len={side}",
                    f"distill.cross_tokenizer={method}", "distill.targets=topk", "distill.top_k=8"], capsys)
    assert "ZeRO stage 3, bf16=False, frozen" in log and f"its own tokenizer ({OTHER_VOCAB} tokens)" in log
    assert re.search(rf"the students' side \d+ of 32 tokens a block, the teacher's \d+ of {side} ", log), log
    assert f"across tokenizers by {line}" in log
    for tag in ("teacher/frozen/loss_ce", "teacher/cross/loss_ce", "student/train/loss_kd", "distill/teacher_lead"):
        assert len(tb[tag]) == 4 and all(map(math.isfinite, tb[tag].values())), tag
    assert "teacher/train/loss" not in tb and max(tb["student/train/loss_kd"].values()) > 0


@pytest.mark.parametrize("override, line", [
    ("data.pack=false", "data: a teacher with another tokenizer (teacher.tokenizer) reads packed plain text only"),
    ("distill.fused_linear=true", "distill.fused_linear=true: a teacher with another tokenizer (teacher.tokenizer) "
                                  "takes the logits path; set it to auto or false"),
    ("distill.token_filter=true", "student.distill.token_filter: not available with a teacher with another "
                                  "tokenizer (teacher.tokenizer); set it to false"),
    ("data.teacher_seq_len=80", "data.teacher_seq_len=80 exceeds teacher's max_position_embeddings=64; lower "
                                "data.teacher_seq_len or raise the model's positions"),
])
def test_what_is_not_available_across_tokenizers_is_one_line(tmp_path, cross_setup, override, line):
    from codistill.config import load_config
    from codistill.preflight import check_inputs

    from conftest import MICRO

    cfg = load_config(MICRO, [*cross_setup, override, f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError) as err:
        check_inputs(cfg, tmp_path / "run")
    assert str(err.value).startswith(line)
    assert not (tmp_path / "run").exists()  # refused before the output folder is claimed


def test_what_a_student_with_its_own_tokenizer_needs_is_one_line(tmp_path, cross_setup):
    """It learns from a teacher with its own tokenizer, live, in mode codistill or soft; its twin reads its side."""
    from codistill.config import load_config
    from codistill.metrics import batch_ce
    from codistill.preflight import check_inputs

    from conftest import MICRO

    third = third_tokenizer(cross_setup)
    plain = [x for x in cross_setup if not x.startswith("teacher.tokenizer=")]
    with pytest.raises(ConfigError, match=r"^student.tokenizer: a student with a tokenizer of its own \(differing "
                                          r"from data.tokenizer\) learns from a teacher with its own too "
                                          r"\(teacher.tokenizer, or the one in teacher.pretrained\); set "
                                          r"data.tokenizer to one student's"):
        check_inputs(load_config(MICRO, [*plain, f"students.0.tokenizer={third}", f"output_dir={tmp_path / 'a'}"]),
                     tmp_path / "a")
    with pytest.raises(ValueError, match=r"student.tokenizer: a student with a tokenizer of its own learns from a "
                                         r"teacher in mode codistill or soft; in mode hard students read data.tokenizer"):
        load_config(MICRO, [*cross_setup, "mode=hard", f"students.0.tokenizer={third}"])
    cfg = load_config(MICRO, [*cross_setup, f"students.0.tokenizer={third}", "students.0.twin=true",
                              f"output_dir={tmp_path / 'b'}"])
    inputs = check_inputs(cfg, tmp_path / "b")
    inputs.release()
    assert {name: prefix for name, (prefix, _) in inputs.sides.items()} == {"student": "s1_", "student_alone": "s1_"}
    assert inputs.own_vocab(cfg.students[1]) == THIRD_VOCAB and inputs.hf_configs["student_alone"].vocab_size == 384
    # a pretrained student folder that holds its own tokenizer reads it, as a teacher's folder does
    from transformers import AutoConfig, AutoModelForCausalLM

    from codistill.data import load_tokenizer

    folder = tmp_path / "pretrained_student"
    hf = AutoConfig.for_model("llama", vocab_size=THIRD_VOCAB, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    AutoModelForCausalLM.from_config(hf).save_pretrained(folder)
    load_tokenizer(third).save_pretrained(folder)
    student = (f"students=[{{name: student, pretrained: {folder}, deepspeed: {{zero_optimization: {{stage: 2}}, "
               "optimizer: {type: AdamW, params: {lr: 1.0e-3}}}}]")
    cfg = load_config(MICRO, [*cross_setup, student, f"output_dir={tmp_path / 'c'}"])
    inputs = check_inputs(cfg, tmp_path / "c")
    inputs.release()
    assert inputs.side(cfg.students[0]) == "s1_" and inputs.own_vocab(cfg.students[0]) == THIRD_VOCAB
    with pytest.raises(ConfigError, match=r"^student.pretrained: a student with a tokenizer of its own \(differing "
                                          r"from data.tokenizer\) learns from a teacher with its own too"):
        check_inputs(load_config(MICRO, [*plain, student, f"output_dir={tmp_path / 'd'}"]), tmp_path / "d")
    # a further side's student compares its CE with the teacher's per token of its side
    values = {"teacher/cross/loss_ce": 5.0, "teacher/cross/s1/loss_ce": 7.0, "teacher/train/loss_ce": 4.0}
    assert batch_ce(values, "teacher") == 5.0 and batch_ce(values, "teacher", "s1_") == 7.0


@pytest.mark.parametrize("side", ["48", "auto"])
def test_a_teacher_side_needs_a_teacher_of_another_tokenizer(tmp_path, side):
    from codistill.config import load_config
    from codistill.preflight import check_inputs

    from conftest import MICRO

    cfg = load_config(MICRO, [f"data.teacher_seq_len={side}", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=rf"^data.teacher_seq_len={side}: a teacher's own side of the blocks exists "
                                          r"only with a tokenizer of its own"):
        check_inputs(cfg, tmp_path / "run")


def test_a_students_missing_tokenizer_folder_is_one_line(tmp_path):
    from codistill.config import load_config
    from codistill.preflight import check_inputs

    from conftest import MICRO

    cfg = load_config(MICRO, ["students.0.tokenizer=/somewhere", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"^student\.tokenizer: tokenizer folder /somewhere does not exist$"):
        check_inputs(cfg, tmp_path / "run")


def test_likelihood_parts_match_the_definition_value_and_gradient_without_an_fp32_copy():
    """Training's chunk-likelihood term (a CE weighted per position, chunked) equals the definition computed
    from whole logits: value and gradient."""
    from codistill.crosstok import likelihood_parts
    from codistill.losses import distill_loss, next_token_targets

    torch.manual_seed(3)
    vs, vt, rows, ls, lt, chunks, temp, alpha = 11, 17, 2, 9, 7, 4, 2.0, 0.3
    zs, zt = torch.randn(rows, ls, vs, requires_grad=True), torch.randn(rows, lt, vt)
    ids_s, ids_t = torch.randint(vs, (rows, ls)), torch.randint(vt, (rows, lt))
    cs, ct = _chunked(rows, ls, chunks, 5), _chunked(rows, lt, chunks, 6)
    labels, mask = next_token_targets(ids_s, torch.ones_like(ids_s))
    t_labels, t_mask = next_token_targets(ids_t, torch.ones_like(ids_t))
    teacher_ce = distill_loss(zt, t_labels, t_mask).token_ce
    batch = {"input_ids": ids_s, "labels": labels, "mask": mask, "teacher_input_ids": ids_t, "student_chunk": cs,
             "teacher_chunk": ct}
    parts, n = likelihood_parts(zs, batch, teacher_ce, alpha, temp, chunk_tokens=5)
    parts.loss.backward()
    got = zs.grad.clone()
    zs.grad = None
    kd, m = chunk_likelihood_loss(zs, ids_s, cs, zt, ids_t, ct, chunks, temp)
    ce = torch.nn.functional.cross_entropy(zs[:, :-1].reshape(-1, vs), ids_s[:, 1:].reshape(-1))
    ((1 - alpha) * ce + alpha * kd).backward()
    assert int(n) == int(m) and parts.kd.item() == pytest.approx(kd.item(), rel=1e-5)
    assert parts.loss.item() == pytest.approx(((1 - alpha) * ce + alpha * kd).item(), rel=1e-5)
    assert torch.allclose(got, zs.grad, atol=1e-6)


def test_the_memory_estimate_gives_the_teacher_its_own_vocabulary(cross_setup):
    from codistill import memory
    from codistill.config import load_config

    from conftest import MICRO

    est = memory.estimate(load_config(MICRO, cross_setup), 2, "cpu")
    assert est.cross and not est.fused and [m.width for m in est.models] == [OTHER_VOCAB, 4096]
    # spread (the default) as project: the teacher's logits and their rows at the boundaries, the student's rows,
    # its gradient and the fp32 targets; chunk likelihoods read the teacher's CE per position only
    assert est.kept_per_position == 2 * OTHER_VOCAB * 4 + 4096 * (2 * 4 + 4)
    likelihood = memory.estimate(load_config(MICRO, [*cross_setup, "distill.cross_tokenizer=likelihood"]), 2, "cpu")
    assert likelihood.kept_per_position == 0 and likelihood.step_peak() < est.step_peak()
    longer = memory.estimate(load_config(MICRO, [*cross_setup, "data.teacher_seq_len=64"]), 2, "cpu")
    assert longer.models[0].logits == 2 * est.models[0].logits and longer.models[1].logits == est.models[1].logits
    # a student with a tokenizer of its own: its own vocabulary, in the models and in what the boundaries keep
    third = third_tokenizer(cross_setup)
    own = memory.estimate(load_config(MICRO, [*cross_setup, f"students.0.tokenizer={third}"]), 2, "cpu")
    assert [m.width for m in own.models] == [OTHER_VOCAB, THIRD_VOCAB]
    assert own.kept_per_position == 2 * OTHER_VOCAB * 4 + THIRD_VOCAB * (2 * 4 + 4)


def test_the_cross_tokenizer_comparison_builds_its_runs_and_checks_its_targets(tmp_path):
    from codistill.commands.compare_crosstok import _run, crossed, report, same, soft_run
    from codistill.config import load_config, validate

    from conftest import MICRO

    base = load_config(MICRO).model_dump(mode="json")
    sided = load_config(MICRO, ["data.teacher_seq_len=48"]).model_dump(mode="json")  # the cross runs' teacher side
    assert validate(same(_run(sided, tmp_path / "t")), "test").data.teacher_seq_len is None  # not the same-tokenizer's
    soft = validate(soft_run(base, 5, tmp_path / "soft", tmp_path / "teacher_hf"), "test")
    assert soft.mode == "soft" and soft.teacher.pretrained == str(tmp_path / "teacher_hf")
    assert [s.name for s in soft.students] == ["student", "student_alone"] and soft.students[0].init_seed == 6
    assert soft.distill.head_start_steps == 0 and soft.train.seed == 5
    assert validate(crossed(dict(base), tmp_path / "tok"), "test").teacher.tokenizer == str(tmp_path / "tok")
    good = {"a": 5.0, "b": 4.9, "c0": 5.2, "c": 5.205, "d0": 5.1, "d": 4.95}  # (b) gains 0.1 of (d)'s 0.15: 67%
    text, ok = report({"corpus": {1: good}}, [1], "cmd", "machine", "gpt2")
    assert ok and ("| corpus | 1 | 5.0000 | 4.9000 | 5.2000 | 5.2050 | 5.1000 | 4.9500 | -0.1000 | +0.0050 | -0.1500 "
                   "| 0.67 |") in text
    codistilled = validate(_run(base, tmp_path / "c", 5), "test")  # (c) beside its own twin: the same head start
    assert [s.name for s in codistilled.students] == ["student", "student_alone"]
    for bad in ({**good, "b": 5.01}, {**good, "b": 4.96}, {**good, "c": 5.22}):  # worse; under half; (c) hurts
        assert not report({"corpus": {1: bad}}, [1], "cmd", "machine", "gpt2")[1]


def test_a_tokenizer_that_cannot_write_the_text_is_one_line(pair):
    from codistill.crosstok import pair_blocks

    class Unknown:  # a stand-in fast tokenizer with an unknown token for anything but ASCII
        is_fast, pad_token_id, eos_token_id, unk_token_id, unk_token = True, 0, 1, 3, "[UNK]"

        def __call__(self, text, **_):
            return {"input_ids": [2 if c.isascii() else 3 for c in text],
                    "offset_mapping": [(i, i + 1) for i in range(len(text))]}

    with pytest.raises(ConfigError, match=r"^data: the teacher's tokenizer cannot represent some of the text \(it "
                                          r"writes its unknown token '\[UNK\]' at 'Tokyo is 東'\)"):
        pair_blocks(["Tokyo is 東京."], pair[0], Unknown(), seq_len=16)


def test_a_teacher_of_another_tokenizer_writes_hard_mode_text_with_its_own(tmp_path, cross_setup, other_teacher,
                                                                            capsys):
    """Generation takes the teacher's own tokenizer, prompts cut from the students' blocks as text."""
    from codistill.commands import generate

    from conftest import MICRO

    data = [x for x in cross_setup if x.startswith("data.")]
    code = generate.main(["--config", str(MICRO), "--out", str(tmp_path / "gen"), "--num-prompts", "4",
                          "--prompt-tokens", "8", "--max-new-tokens", "4", "--batch-size", "2",
                          f"teacher.pretrained={other_teacher}", "teacher.config={}", *data])
    out = capsys.readouterr()
    assert code == 0 and " prompt/response pairs to " in out.out, out.err[-2000:]


def test_a_cached_teacher_of_another_tokenizer_holds_its_ce_per_position(tmp_path, cross_setup, other_teacher, capsys):
    """codistill-cache-logits runs the teacher over its own columns of the paired blocks; soft mode reads its CE
    per position from the cache for chunk likelihoods, without loading the teacher."""
    from codistill.commands import cache_logits
    from codistill.config import load_config
    from codistill.preflight import check_inputs

    from conftest import MICRO

    setup = [x for x in cross_setup if not x.startswith("teacher.tokenizer=")]
    soft = [*setup, "mode=soft", f"teacher.pretrained={other_teacher}", "teacher.config={}"]
    cache = tmp_path / "cache"
    assert cache_logits.main(["--config", str(MICRO), "--out", str(cache), *soft]) == 0
    assert "cached top-64 teacher predictions" in capsys.readouterr().out
    meta = json.loads((cache / "codistill_cache.json").read_text())
    assert meta["complete"] and "teacher_tokenizer" in meta
    log, tb = _fit([f"output_dir={tmp_path / 'run'}", *soft, f"teacher.cache={cache}"], capsys)
    assert "teacher: not loaded; its CE per position over its own tokenization of the same text" in log
    for tag in ("teacher/frozen/loss_ce", "teacher/cross/loss_ce", "student/train/loss_kd", "distill/teacher_lead"):
        assert len(tb[tag]) == 4 and all(map(math.isfinite, tb[tag].values())), tag
    assert max(tb["student/train/loss_kd"].values()) > 0
    cfg = load_config(MICRO, [*soft, f"teacher.cache={cache}", "distill.cross_tokenizer=sorted"])
    with pytest.raises(ConfigError, match="holds its CE per position, what cross_tokenizer=likelihood reads"):
        check_inputs(cfg, tmp_path / "sorted")


def test_the_summary_gives_a_teacher_of_another_tokenizer_both_figures(tmp_path):
    from codistill.metrics import summary_lines

    final = {"teacher/eval/loss": 5.7365, "teacher/eval/loss_aligned": 4.9721, "student/eval/loss": 5.3065,
             "other/eval/loss": 4.1, "other/eval/loss_aligned": 5.0}
    lines = summary_lines(final, {}, "teacher", ["student", "other"], 1.0, 0, tmp_path, tmp_path)
    assert lines[1] == ("  teacher: validation loss 5.7365 (perplexity 310.0) per token of its own tokenizer, "
                        "4.9721 per token of the run's (data.tokenizer)")
    assert lines[2].startswith("  student: validation loss 5.3065 (perplexity 201.6), +0.3344 vs the teacher")
    # a student with a tokenizer of its own: compared with the teacher on the run's tokens, the same text
    assert lines[3].startswith("  other: validation loss 4.1000 (perplexity 60.3) per token of its own tokenizer, "
                               "5.0000 per token of the run's (data.tokenizer), +0.0279 vs the teacher")
