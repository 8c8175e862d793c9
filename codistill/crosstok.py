"""Distillation across tokenizers: where two tokenizations of one text agree, and the losses that
compare a teacher and a student there.

Two tokenizers cut the same characters differently ("naïve" may be three tokens in one and one in
the other, a space may open the next token or close the last). Their *common boundaries* are the
character positions where both have a token ending: between two consecutive ones lie the same
characters in both, as a *chunk* of one or more tokens on each side. From each tokenizer's own
offset mapping (a fast tokenizer's ``return_offsets_mapping``; byte-level pieces of one character
share its offsets) :func:`align` gives every token of one text its chunk; :func:`pair_blocks` does the
same over a batch of documents in the data pipeline and packs both tokenizations into paired blocks.

Three losses use the chunks, with different trade-offs:

- :func:`chunk_likelihood_loss` (approximate likelihood matching, Minixhofer et al. 2025): a chunk's
  likelihood is the product of its tokens' probabilities under each model; the loss is τ times the
  binary KL between the teacher's and the student's chunk probabilities (``exp(log-likelihood / τ)``).
  Exact on aligned text: no vocabulary mapping, every chunk counted; training computes it as a CE
  weighted per position (:func:`likelihood_parts`).
- :func:`sorted_distribution_loss` (universal logit distillation, Boizard et al. 2024, at common
  boundaries): where a chunk ends, both models predict what comes after the same characters; their
  next-token distributions, sorted by probability, are compared rank by rank (the L1 distance of the
  sorted top-k, the Wasserstein distance of ULD with the tails' mass difference). Needs no
  likelihood of a long chunk, ignores which token is which: cheap, and blind to the teacher's
  preference between tokens.
- :func:`projected_loss` (a vocabulary projection at common boundaries, as in token-mapping methods such
  as MinED's): where a chunk ends, the teacher's next-token distribution is moved onto the student's
  vocabulary, each teacher token's probability given to the student's first token of the same text
  (:func:`vocab_map`), and the run's divergence compares it with the student's, full or top-k. Keeps
  which token is which; approximate where the student would begin the next characters with a token
  longer than the teacher's next one.
- ``spread`` (:func:`projected_targets` with a back map): the same, but each teacher token's probability
  is shared among the student tokens whose text the teacher would begin with it (its newline among the
  student's newline-and-indentation tokens), in proportion to the student's own detached probabilities:
  the teacher says which characters come next, the student how it writes them.
"""
from __future__ import annotations

import dataclasses
import re
import time
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch

from .errors import ConfigError
from .losses import LossParts, SoftSpec, Targets, chunk_rows, distill_loss, weighted_ce


class Alignment(NamedTuple):
    """One text's two tokenizations, chunk by chunk: ``student_chunk[i]`` / ``teacher_chunk[j]`` is the
    chunk of the i-th / j-th token (-1: a token after the last common boundary, in no chunk), ``chunks``
    the number of chunks, ``aligned`` the share of the text's characters inside a chunk."""

    student_chunk: np.ndarray
    teacher_chunk: np.ndarray
    chunks: int
    aligned: float


def offsets(tokenizer, text: str, where: str) -> tuple[list[int], np.ndarray]:
    """The text's token ids and each token's end offset (characters), from the tokenizer's own offset
    mapping; a one-line error naming ``where`` for a tokenizer that has none (a slow tokenizer)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"{where}: the tokenizer {type(tokenizer).__name__} gives no character offsets (a slow "
                          "tokenizer); distilling across tokenizers needs a fast one (a tokenizer.json)")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ends = np.asarray([end for _, end in enc["offset_mapping"]], dtype=np.int64)
    return enc["input_ids"], ends


def align(student_ends: Sequence[int], teacher_ends: Sequence[int], length: int) -> Alignment:
    """Chunk every token of two tokenizations of one text of ``length`` characters from their end offsets.

    A common boundary is a position where a token of each ends and no token of either runs past it
    (ends only grow along a tokenization, so the running maximum decides); the chunk of a token is
    the first common boundary at or after its end."""
    s, t = np.asarray(student_ends, dtype=np.int64), np.asarray(teacher_ends, dtype=np.int64)
    s_reach, t_reach = np.maximum.accumulate(s) if len(s) else s, np.maximum.accumulate(t) if len(t) else t
    common, s_chunk, t_chunk = _chunked(s_reach, t_reach)
    covered = int(common[-1]) if len(common) else 0
    return Alignment(s_chunk, t_chunk, len(common), covered / length if length else 0.0)


def _chunked(s_reach: np.ndarray, t_reach: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The common boundaries of two tokenizations given each token's running maximum end (a position both
    reach: nothing straddles it), and each token's chunk: the first common boundary at or after its end
    (-1 past the last)."""
    common = np.intersect1d(s_reach, t_reach)
    common = common[common > 0]

    def chunk_of(reach: np.ndarray) -> np.ndarray:
        at = np.searchsorted(common, reach, side="left")
        return np.where(at < len(common), at, -1)

    return common, chunk_of(s_reach), chunk_of(t_reach)


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(token i | tokens before it) at temperature T, [B, S] (position 0 has no prediction: 0),
    computed from unshifted logits [B, S, V] without materialising the log-softmax."""
    z = logits[:, :-1].float() / temperature
    picked = z.gather(-1, ids[:, 1:, None]).squeeze(-1) - torch.logsumexp(z, dim=-1)
    return torch.nn.functional.pad(picked, (1, 0))


def chunk_sums(values: torch.Tensor, chunk: torch.Tensor, chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the sum of ``values`` [B, S] over each chunk's positions (``chunk`` [B, S], -1 for none), and
    which chunks are whole: every token of them present with a prediction (a chunk holding a row's first
    token, whose probability no model gives, is not)."""
    rows = values.shape[0]
    index = chunk.clamp(min=0)
    member = (chunk >= 0).to(values.dtype)
    sums = values.new_zeros(rows, chunks).scatter_add_(1, index, values * member)
    has_first = torch.zeros(rows, chunks, dtype=torch.bool, device=values.device)
    has_first.scatter_(1, index[:, :1], (chunk[:, :1] >= 0))
    present = torch.zeros(rows, chunks, dtype=torch.bool, device=values.device).scatter_(1, index, chunk >= 0)
    return sums, present & ~has_first


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def chunk_likelihood_loss(student_logits: torch.Tensor, student_ids: torch.Tensor, student_chunk: torch.Tensor,
                          teacher_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_chunk: torch.Tensor,
                          chunks: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """T times the mean over whole chunks of the binary KL between the teacher's and the student's chunk
    probabilities ``p = exp(sum of the chunk's token log-probabilities / T)``:
    ``T·[p_t·log(p_t/p_s) + (1−p_t)·log((1−p_t)/(1−p_s))]``; the teacher's side is detached. The factor T
    keeps the term's scale whatever T (as KD's T²): its gradient in a chunk's log-likelihood shrinks as 1/T,
    and as T grows T·KL tends to ``(ℓ_t − ℓ_s)² / (2·|ℓ|)``, the squared gap of the chunk log-likelihoods
    ℓ over their size. Returns the loss and the number of chunks it averages (chunks whole in both). The
    definition, from whole logits: training takes :func:`likelihood_parts`, which never holds an fp32 copy
    of them."""
    with torch.no_grad():
        teacher = token_logprobs(teacher_logits, teacher_ids)
    return chunk_kl(token_logprobs(student_logits, student_ids), student_chunk, teacher, teacher_chunk, chunks,
                    temperature)


def chunk_kl(student: torch.Tensor, student_chunk: torch.Tensor, teacher: torch.Tensor, teacher_chunk: torch.Tensor,
             chunks: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`chunk_likelihood_loss` from the tokens' log-probabilities [B, S] of each side."""
    s_sum, s_whole = chunk_sums(student, student_chunk, chunks)
    t_sum, t_whole = chunk_sums(teacher.detach(), teacher_chunk, chunks)
    counted = s_whole & t_whole
    floor = -1e-6  # a chunk of probability 1 has no "not this chunk" side
    ls, lt = (s_sum / temperature).clamp(max=floor), (t_sum / temperature).clamp(max=floor)
    pt = lt.exp()
    kl = pt * (lt - ls) + (1 - pt) * (_log1mexp(lt) - _log1mexp(ls))
    n = counted.sum()
    return temperature * (kl * counted).sum() / n.clamp(min=1), n


def boundary_positions(chunk: torch.Tensor, chunks: int) -> torch.Tensor:
    """Per row [B, S] of chunk ids, the position of each chunk's last token [B, chunks] (-1 where absent):
    the logits there predict what follows the chunk's characters."""
    rows, length = chunk.shape
    pos = torch.arange(length, device=chunk.device).expand(rows, length)
    out = torch.full((rows, chunks), -1, dtype=torch.long, device=chunk.device)
    return out.scatter_reduce_(1, chunk.clamp(min=0), torch.where(chunk >= 0, pos, -1), reduce="amax")


def boundaries(student_chunk: torch.Tensor, teacher_chunk: torch.Tensor,
               chunks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every common boundary with a next chunk on both sides, as (row, the student's position, the teacher's
    position) [N] each: the positions ending a chunk, where both models predict what follows the same text."""
    s_pos, t_pos = boundary_positions(student_chunk, chunks), boundary_positions(teacher_chunk, chunks)
    next_s = torch.cat([s_pos[:, 1:], s_pos.new_full((s_pos.shape[0], 1), -1)], dim=1)
    next_t = torch.cat([t_pos[:, 1:], t_pos.new_full((t_pos.shape[0], 1), -1)], dim=1)
    counted = (s_pos >= 0) & (t_pos >= 0) & (next_s >= 0) & (next_t >= 0)  # a next chunk to predict, both sides
    rows, at = counted.nonzero(as_tuple=True)
    return rows, s_pos[rows, at], t_pos[rows, at]


def sorted_distribution_loss(student_logits: torch.Tensor, student_chunk: torch.Tensor,
                             teacher_logits: torch.Tensor, teacher_chunk: torch.Tensor, chunks: int, k: int,
                             temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over common boundaries (but the last) of ``Σ_r |p_s(r) − p_t(r)| + |tail_s − tail_t|`` over the
    ranks r ≤ k of each model's next-token distribution at T sorted by probability (tail: the mass past
    rank k). At the position ending a chunk on each side both models predict what follows the same text.
    Returns the loss and the number of boundaries averaged."""
    rows, s_at, t_at = boundaries(student_chunk, teacher_chunk, chunks)
    if rows.numel() == 0:
        return student_logits.sum() * 0.0, rows.new_zeros(())
    zs = student_logits[rows, s_at].float() / temperature
    with torch.no_grad():
        zt = teacher_logits[rows, t_at].float() / temperature
        pt = zt.softmax(-1).topk(min(k, zt.shape[-1]), dim=-1).values
    ps = zs.softmax(-1).topk(min(k, zs.shape[-1]), dim=-1).values
    width = max(ps.shape[-1], pt.shape[-1])
    ps, pt = (torch.nn.functional.pad(p, (0, width - p.shape[-1])) for p in (ps, pt))
    tails = ((1 - ps.sum(-1)) - (1 - pt.sum(-1))).abs()
    return ((ps - pt).abs().sum(-1) + tails).mean(), rows.new_tensor(rows.numel())


def vocab_map(teacher, student, device: Optional[torch.device] = None) -> Optional[torch.Tensor]:
    """For each id of the teacher's tokenizer, the id of the student's first token of the same characters
    [V_t] (None without a teacher tokenizer): the token the student begins them with in the middle of a
    text. Works from what each token spells (:func:`token_bytes`), so SentencePiece's "▁" spaces and byte
    fallback, GPT-2's byte alphabet and WordPiece's "##" all map by their characters. The teacher's special
    tokens, and tokens that spell nothing, map to the student's end-of-text."""
    if teacher is None:
        return None
    end = student.eos_token_id if student.eos_token_id is not None else student.unk_token_id or 0
    out = torch.tensor(first_tokens(student, token_bytes(teacher), end), dtype=torch.long)
    return out.to(device) if device is not None else out


def vocab_maps(teacher, student, learners, device: torch.device) -> tuple[Optional[torch.Tensor], Optional["SpreadMap"]]:
    """What the learners of ``learners`` (``RunConfig.learners()``) read of a teacher with another tokenizer:
    :func:`vocab_map` of its tokenizer onto the students' where one projects or spreads, and the groups of
    ``spread`` (:func:`spread_map`) where one spreads (each None otherwise, and without a teacher tokenizer)."""
    methods = {d.cross_tokenizer for _, d, _ in learners} if teacher is not None else set()
    mapping = vocab_map(teacher, student, device) if methods & {"project", "spread"} else None
    return mapping, spread_map(mapping, vocab_map(student, teacher, device)) if "spread" in methods else None


def own_by_side(teacher, sides: dict) -> dict:
    """The tokenizers other than the run's by the prefix of their side's columns: a teacher's own (:data:`CROSS`),
    each further students' side's (``sides``: data.student_sides)."""
    return ({CROSS: teacher} if teacher is not None else {}) | dict(sides.values())


def side_maps(teacher, run, sides: dict, learners, device: torch.device) -> dict[str, tuple]:
    """:func:`vocab_maps` per students' side (by column prefix: "" for the run's tokenizer, one per further
    side of ``sides``, data.student_sides), each for the learners that read that side."""
    tokenizers = {"": run} | dict(sides.values())
    return {prefix: vocab_maps(teacher, tok, [x for x in learners if sides.get(x[0].name, ("",))[0] == prefix], device)
            for prefix, tok in tokenizers.items()}


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte-fallback tokens


def token_bytes(tokenizer) -> list[Optional[bytes]]:
    """The bytes each id of ``tokenizer`` stands for in the middle of a text; None for special tokens. A
    byte-level BPE spells bytes in GPT-2's alphabet; any other tokenizer is decoded after an anchor token
    (a lone "▁the" decodes to "the", after "a" to " the") unless the token is a byte of its byte fallback."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    ids = list(range(len(tokenizer)))
    pieces = tokenizer.convert_ids_to_tokens(ids)
    added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    byte_level = _byte_level(tokenizer)
    if byte_level:
        alphabet = {c: b for b, c in bytes_to_unicode().items()}
        out = [bytes(alphabet[c] for c in p) if all(c in alphabet for c in p) else p.encode() for p in pieces]
    else:
        anchor = tokenizer("a", add_special_tokens=False)["input_ids"][-1:]
        lead = len(tokenizer.decode(anchor, clean_up_tokenization_spaces=False))
        texts = tokenizer.batch_decode([anchor + [i] for i in ids], clean_up_tokenization_spaces=False)
        out = [t[lead:].encode() for t in texts]
    for i, text in added.items():
        out[i] = text.encode()
    if not byte_level:  # the bytes of its byte fallback, in its vocabulary or added
        for i, p in enumerate(pieces):
            if m := _BYTE_PIECE.fullmatch(p or ""):
                out[i] = bytes([int(m.group(1), 16)])
    for i in tokenizer.all_special_ids:
        out[i] = None
    return out


def first_tokens(student, spelled: Sequence[Optional[bytes]], end: int) -> list[int]:
    """The student's first token of each byte string in the middle of a text (after a newline, or after a
    letter where the student merges it with the newline, found by the offsets; alone if both merge), ``end``
    for None or nothing. Bytes that are no whole text (a piece of one character) map by their first byte:
    the byte-level BPE's token for it, or the byte-fallback token."""
    texts, partial = {}, {}
    for i, b in enumerate(spelled):
        if b:
            try:
                texts[i] = b.decode("utf-8")
            except UnicodeDecodeError:
                partial[i] = b
    out, pending = [end] * len(spelled), list(texts)
    for lead in ("\n", "a"):
        if not pending:
            break
        enc = student([lead + texts[i] for i in pending], add_special_tokens=False, return_offsets_mapping=True)
        merged = []
        for i, ids, spans in zip(pending, enc["input_ids"], enc["offset_mapping"]):
            at = next((k for k, (_, stop) in enumerate(spans) if stop > len(lead)), None)
            if at is not None and spans[at][0] >= len(lead):
                out[i] = ids[at]
            else:
                merged.append(i)
        pending = merged
    if pending:  # alone, the first token that spells a beginning of it (not a "▁" the student prepends)
        own = token_bytes(student)
        for i, ids in zip(pending, student([texts[i] for i in pending], add_special_tokens=False)["input_ids"]):
            out[i] = next((t for t in ids if own[t] and spelled[i].startswith(own[t])), ids[0] if ids else end)
    for i, b in partial.items():
        out[i] = _byte_token(student, b[0])
    return out


def _byte_token(student, byte: int) -> int:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    if _byte_level(student):
        return student.backend_tokenizer.model.tokenize(bytes_to_unicode()[byte])[0].id
    piece = student.convert_tokens_to_ids(f"<0x{byte:02X}>")
    if piece is not None and piece != student.unk_token_id:
        return piece
    return student("\ufffd", add_special_tokens=False)["input_ids"][0]


def _byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.decoder).__name__ == "ByteLevel" and \
        type(backend.model).__name__ == "BPE"


class SpreadMap(NamedTuple):
    """Which student tokens share each teacher token's probability under ``spread`` (:func:`spread_map`): the
    teacher tokens that some student token's text begins with (``groups`` [G]; every other teacher token gives
    its probability to its first student token, as ``project`` does), each student token's group (``member``
    [V_s], a column of ``groups``), and the grouped teacher tokens whose first student token belongs to another
    group (``alone`` [A], columns of ``groups``; ``alone_to`` [A], that student token). Built once: the step's
    work is then ``project``'s plus a few operations [N, V_s]."""

    mapping: torch.Tensor
    groups: torch.Tensor
    member: torch.Tensor
    alone: torch.Tensor
    alone_to: torch.Tensor


def spread_map(mapping: torch.Tensor, back: torch.Tensor) -> SpreadMap:
    """The groups of ``spread`` from :func:`vocab_map` both ways: ``mapping`` [V_t] (the student's first token of
    each teacher token's text) and ``back`` [V_s] (the teacher's first token of each student token's text). The
    group of teacher token t: the student tokens s with ``back[s] == t``, and ``mapping[t]``."""
    grouped = torch.zeros(mapping.numel(), dtype=torch.bool, device=mapping.device)
    grouped[back] = True
    groups = grouped.nonzero().squeeze(1)
    column = torch.full_like(mapping, -1)
    column[groups] = torch.arange(groups.numel(), device=mapping.device)
    alone = groups[back[mapping[groups]] != groups]
    return SpreadMap(mapping, groups, column[back], column[alone], mapping[alone])


class Spread(NamedTuple):
    """What ``spread`` reads besides the teacher: its groups (:class:`SpreadMap`) and the student's logits
    [B, S, V_s] at its boundary positions [N]."""

    groups: SpreadMap
    student_logits: torch.Tensor
    positions: torch.Tensor


def spread_probs(p: torch.Tensor, own: torch.Tensor, m: SpreadMap) -> torch.Tensor:
    """The teacher's next-token probabilities ``p`` [N, V_t] on the student's vocabulary: each teacher token's
    probability shared among its group's student tokens (:func:`spread_map`) in proportion to the student's
    probabilities ``own`` [N, V_s]; a group whose tokens all have probability 0 gives it to the teacher token's
    first student token. ``p`` is overwritten."""
    grouped = p.index_select(1, m.groups)
    p.index_fill_(1, m.groups, 0)  # what remains goes to each token's first student token, as in project
    q = p.new_zeros(own.shape).index_add_(1, m.mapping, p)
    extra = own.index_select(1, m.alone_to)
    total = grouped.new_zeros(grouped.shape).index_add_(1, m.member, own).index_add_(1, m.alone, extra)
    empty = total <= 1e-30
    share = torch.where(empty, 0.0, grouped / total.clamp(min=1e-30))  # per unit of the student's probability
    q.addcmul_(own, share.index_select(1, m.member))
    q.index_add_(1, m.alone_to, extra * share.index_select(1, m.alone))
    return q.index_add_(1, m.mapping.index_select(0, m.groups), torch.where(empty, grouped, 0.0))


def projected_targets(teacher_logits: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, mapping: torch.Tensor,
                      vocab: int, temperature: float, top_k: Optional[int] = None,
                      chunk_tokens: Optional[int] = None, spread: Optional[Spread] = None) -> Targets:
    """The teacher's next-token distributions at T at (``rows``, ``positions``) [N] of its logits [B, S, V_t],
    moved onto the student's vocabulary of ``vocab`` tokens, each token's probability added to the student's
    token ``mapping`` gives it, or with ``spread`` shared among the student's tokens (:func:`spread_probs`, the
    student's probabilities at T): full (as logits ``T·log q``, which the loss's softmax at T turns back into q)
    or the top ``top_k`` of q and the tail's mass. Row chunk by row chunk, in fp32 (rows picked per chunk: no
    copy of all of them, and none of logits sliced off a padded head)."""
    n, device = rows.numel(), teacher_logits.device
    full = top_k is None
    k = vocab if full else min(top_k, vocab)
    logits = torch.empty(n, vocab, device=device) if full else None
    ids = None if full else torch.empty(n, k, dtype=torch.int32, device=device)
    logp = None if full else torch.empty(n, k, device=device)
    tail = None if full else torch.empty(n, device=device)
    width = max(vocab, teacher_logits.shape[-1]) + (0 if spread is None else vocab)  # spread: the student's rows too
    step, mapping = chunk_rows(width, chunk_tokens), mapping.to(device)
    for i in range(0, n, step):
        z = teacher_logits[rows[i:i + step], positions[i:i + step]]
        p = (z if temperature == 1 else z / temperature).softmax(-1, dtype=torch.float32)
        if spread is None:
            q = p.new_zeros(p.shape[0], vocab).index_add_(1, mapping, p)
        else:
            zs = spread.student_logits[rows[i:i + step], spread.positions[i:i + step]].detach()
            own = (zs if temperature == 1 else zs / temperature).softmax(-1, dtype=torch.float32)
            q = spread_probs(p, own, spread.groups)
        if full:
            logits[i:i + step] = temperature * q.clamp(min=1e-30).log()
            continue
        top = q.topk(k, dim=-1)
        ids[i:i + step], logp[i:i + step] = top.indices, top.values.clamp(min=1e-30).log()
        tail[i:i + step] = (1 - top.values.sum(-1)).clamp(min=0).log()
    return Targets(temperature=temperature, logits=logits, topk_ids=ids, topk_logp=logp, tail_logp=tail)


def projected_loss(student_logits: torch.Tensor, student_chunk: torch.Tensor, teacher_logits: torch.Tensor,
                   teacher_chunk: torch.Tensor, chunks: int, mapping: torch.Tensor, spec: SoftSpec,
                   temperature: float = 1.0, top_k: Optional[int] = None, chunk_tokens: Optional[int] = None,
                   groups: Optional[SpreadMap] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``T²·mean D(q ‖ p_s)`` over the common boundaries (:func:`boundaries`), D ``spec``'s divergence, q the
    teacher's next-token distribution projected onto the student's vocabulary (:func:`projected_targets`; with
    ``groups``, spread by the student's probabilities),
    p_s the student's; computed by the chunked loss of one tokenizer (only the boundaries' rows are
    gathered). Returns the loss and the number of boundaries averaged."""
    rows, s_at, t_at = boundaries(student_chunk, teacher_chunk, chunks)
    if rows.numel() == 0:
        return student_logits.sum() * 0.0, rows.new_zeros(())
    with torch.no_grad():
        targets = projected_targets(teacher_logits, rows, t_at, mapping, student_logits.shape[-1], temperature, top_k,
                                    chunk_tokens, None if groups is None else Spread(groups, student_logits, s_at))
    n = rows.numel()  # the student's rows copied once (with their gradient); no reshape copies padded-head logits
    parts = distill_loss(student_logits[rows, s_at], rows.new_zeros(n), torch.ones(n, dtype=torch.bool,
                         device=rows.device), targets, dataclasses.replace(spec, alpha=1.0), chunk_tokens)
    return parts.loss, rows.new_tensor(n)


CROSS = "teacher_"  # the prefix of a paired block's columns in the teacher's own tokenization
STATS = ("dropped_tokens", "tokenize_s", "align_s", "student_tokens", "teacher_tokens")  # what pairing a batch
# of documents left out, its cost, and the tokens each side's blocks hold
PAIRED = ("input_ids", "attention_mask", "loss_mask", CROSS + "input_ids", CROSS + "attention_mask",
          CROSS + "loss_mask", "student_chunk", "teacher_chunk")  # the columns of a paired block


def start_tokens(tok) -> list[int]:
    """The ids a tokenizer puts before a text of its own accord (Llama's <s>, Gemma's <bos>; none for a GPT-2-style
    byte-level BPE): each packed document starts with them, as the model's pretraining text did."""
    plain = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a", add_special_tokens=True)["input_ids"]
    at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)
    return list(full[:at])


def side_prefix(k: int) -> str:
    """The column prefix of the k-th further students' side of a paired block (k >= 1): a student with a
    tokenizer of its own reads ``s<k>_input_ids``, ..., and its chunks against the teacher's tokens
    ``s<k>_student_chunk`` / ``s<k>_teacher_chunk``; the first students' side keeps the plain names."""
    return f"s{k}_"


def side_columns(prefix: str) -> tuple[str, ...]:
    """The columns of one further students' side (:func:`side_prefix`)."""
    return tuple(prefix + name for name in ("input_ids", "attention_mask", "loss_mask", "student_chunk",
                                            "teacher_chunk"))


def pair_blocks(texts: Sequence[str], student, teacher, seq_len: int, teacher_len: Optional[int] = None,
                others: Sequence = ()) -> dict[str, list]:
    """Documents tokenized both ways and packed into paired blocks of the same characters (a ``datasets``
    batched map): each block starts and ends at a common boundary and holds at most ``seq_len`` tokens on
    the students' side and ``teacher_len`` (default ``seq_len``) on the teacher's (each side padded to its
    length); a document ends with each tokenizer's end-of-text, which both place at one boundary. Chunk ids
    count from 0 in each block (-1: padding). A chunk longer than a side's length (characters neither
    tokenizer cuts alike over that span) is left out, and counted in ``dropped_tokens``.

    ``others``: the tokenizers of further students' sides (:func:`side_prefix`), each of at most ``seq_len``
    tokens. Blocks are then cut at boundaries common to every side, so that every model reads the same
    characters; inside a block each students' side keeps its own chunks against the teacher's tokens (the
    boundaries common to the two of them, finer than those common to all)."""
    teacher_len = teacher_len or seq_len
    tokenizers = [student, teacher, *others]
    lengths = [seq_len, teacher_len] + [seq_len] * len(others)
    ids, reach, started, tokenizing = _tokenized(texts, tokenizers)
    common = reach[0][np.isin(reach[0], reach[1])]
    for r in reach[2:]:
        common = common[np.isin(common, r)]
    common = np.unique(common[common > 0])
    cum = [np.searchsorted(np.searchsorted(common, r, side="left"), np.arange(len(common) + 1)) for r in reach]
    pairs = [_chunked(reach[k], reach[1])[1:] for k in (0, *range(2, len(tokenizers)))]  # per students' side
    out: dict[str, list] = {name: [] for name in (*PAIRED, *STATS)}
    for k in range(1, len(others) + 1):
        out.update({name: [] for name in side_columns(side_prefix(k))})
    starts = [set(start_tokens(tok)) - {tok.eos_token_id} for tok in tokenizers]
    c0, dropped = 0, 0
    while c0 < len(common):
        c1 = min(np.searchsorted(c, c[c0] + n, side="right") for c, n in zip(cum, lengths)) - 1
        if c1 <= c0:  # one chunk longer than a block
            dropped += int(cum[0][c0 + 1] - cum[0][c0])
            c0 += 1
            continue
        spans = [slice(c[c0], c[c1]) for c in cum]
        t_ids = ids[1][spans[1]]
        for k, (s_chunk, t_chunk) in enumerate(pairs):
            side = 0 if k == 0 else k + 1
            s_part, t_part = s_chunk[spans[side]], t_chunk[spans[1]]
            _add_block(out, side_prefix(k) if k else "", (lengths[side], teacher_len), ids[side][spans[side]],
                       s_part - s_part[0], tokenizers[side], t_ids, t_part - t_part[0], teacher,
                       [starts[side], starts[1]], teacher_side=k == 0)
        c0 = c1
    rows = len(out["input_ids"])  # the batch's figures ride on its first block (a map's columns are per row)
    held = (sum(map(sum, out["attention_mask"])), sum(map(sum, out[CROSS + "attention_mask"])))
    for name, value in zip(STATS, (dropped, tokenizing, time.perf_counter() - started - tokenizing, *held)):
        out[name] = [value] + [0] * (rows - 1) if rows else []
    return out


def _tokenized(texts: Sequence[str], tokenizers: Sequence) -> tuple[list[list[int]], list[np.ndarray], float, float]:
    """Every document tokenized by each tokenizer and concatenated: per tokenizer the ids (each document opened by
    the tokenizer's start tokens and closed by its end-of-text) and each token's running maximum end in characters
    of the whole batch; then the start time and the seconds spent in the tokenizers."""
    names = ["students'", "teacher's"] + [f"student side {k}'s" for k in range(1, len(tokenizers) - 1)]
    ids, reach = [[] for _ in tokenizers], [[] for _ in tokenizers]
    base, started, tokenizing = 0, time.perf_counter(), 0.0
    starts = [start_tokens(tok) for tok in tokenizers]  # each document's first ids
    for text in texts:
        for k, tok in enumerate(tokenizers):
            at = time.perf_counter()
            got, ends = offsets(tok, text, "data")
            tokenizing += time.perf_counter() - at
            if tok.unk_token_id is not None and tok.unk_token_id in got:
                at = ends[got.index(tok.unk_token_id)]
                raise ConfigError(f"data: the {names[k]} tokenizer cannot represent some of the text (it writes its "
                                  f"unknown token {tok.unk_token!r} at {text[max(0, at - 20):at]!r}); distilling across "
                                  "tokenizers needs both to write every character (byte-level tokenizers do)")
            reached = [*(base + np.maximum.accumulate(ends)).tolist(), base + len(text) + 1]
            ids[k] += [*starts[k], *got, tok.eos_token_id]  # the start tokens: in the chunk of the first characters
            reach[k] += [reached[0]] * len(starts[k]) + reached
        base += len(text) + 1
    return ids, [np.asarray(r, dtype=np.int64) for r in reach], started, tokenizing


def _add_block(out: dict[str, list], prefix: str, lengths: tuple[int, int], s_ids, s_chunk, student, t_ids, t_chunk,
               teacher, unscored: list[set], teacher_side: bool = True) -> None:
    """One paired block, each side padded to its length; each side's ``unscored`` ids (a document's start
    tokens, the students' then the teacher's) are read, not predicted: neither model's CE, nor a chunk's
    likelihood, counts them. ``prefix``: the students' side's columns (:func:`side_prefix`); the teacher's
    columns are written with the first side only (``teacher_side``)."""
    def padded(values, fill, side):
        values = list(values)
        return values + [fill] * (lengths[side] - len(values))

    s_pad = student.pad_token_id if student.pad_token_id is not None else student.eos_token_id
    out[prefix + "input_ids"].append(padded(s_ids, s_pad, 0))
    out[prefix + "attention_mask"].append(padded([1] * len(s_ids), 0, 0))
    out[prefix + "loss_mask"].append(padded([int(i not in unscored[0]) for i in s_ids], 0, 0))
    out[prefix + "student_chunk"].append(padded(s_chunk.tolist(), -1, 0))
    out[prefix + "teacher_chunk"].append(padded(t_chunk.tolist(), -1, 1))
    if teacher_side:
        t_pad = teacher.pad_token_id if teacher.pad_token_id is not None else teacher.eos_token_id
        out[CROSS + "input_ids"].append(padded(t_ids, t_pad, 1))
        out[CROSS + "attention_mask"].append(padded([1] * len(t_ids), 0, 1))
        out[CROSS + "loss_mask"].append(padded([int(i not in unscored[1]) for i in t_ids], 0, 1))


READS_LOGITS = ("sorted", "project", "spread")  # the methods that read the teacher's logits (likelihood: its CE)


class CrossTeacher(NamedTuple):
    """What a student's soft term reads of a teacher with another tokenizer, on the teacher's own columns of a
    paired block: its detached logits (for ``sorted``, ``project`` and ``spread``), its per-position CE (for
    ``likelihood``), the map of its vocabulary onto the student's (:func:`vocab_map`, for ``project``) and the
    groups of ``spread`` (:func:`spread_map`)."""

    logits: Optional[torch.Tensor]  # None where only ``likelihood`` reads it
    token_ce: torch.Tensor
    mapping: Optional[torch.Tensor] = None
    groups: Optional[SpreadMap] = None


def cross_parts(logits: torch.Tensor, batch: dict[str, torch.Tensor], teacher: CrossTeacher, d, alpha: float,
                temperature: float) -> LossParts:
    """A student's loss with a teacher of another tokenizer: ``(1 − α)·CE + α·D`` where D is the divergence
    ``d.cross_tokenizer`` names (``d``: the student's distill settings) over the paired block's chunks: chunk
    likelihoods at ``d.likelihood_temperature``, sorted distributions at ``temperature`` over ``d.top_k`` ranks,
    or the teacher's distributions projected (or spread) onto the student's vocabulary (``d``'s divergence, T and
    targets); ``kd`` is D, logged even at α = 0, and ``filtered`` the aligned share: the chunks (likelihood) or
    chunk ends (the others) compared per counted token of the student (1: every token a chunk of its own)."""
    if d.cross_tokenizer == "likelihood":
        parts, n = likelihood_parts(logits, batch, teacher.token_ce, alpha, d.likelihood_temperature, d.chunk_tokens)
    else:
        plain = distill_loss(logits, batch["labels"], batch["mask"], chunk_tokens=d.chunk_tokens)
        where = (logits, batch["student_chunk"], teacher.logits.detach(), batch["teacher_chunk"], logits.shape[1])
        kd, n = sorted_distribution_loss(*where, d.top_k, temperature) if d.cross_tokenizer == "sorted" else \
            projected_loss(*where, teacher.mapping, SoftSpec(d.divergence, d.beta), temperature,
                           d.top_k if d.targets == "topk" else None, d.chunk_tokens,
                           teacher.groups if d.cross_tokenizer == "spread" else None)
        loss = plain.loss if alpha == 0 else (1 - alpha) * plain.loss + alpha * kd
        parts = plain._replace(loss=loss, kd=kd.detach())
    return parts._replace(filtered=n.to(torch.float32) / batch["mask"].sum().clamp(min=1))


def _shifted(token_ce: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Each token's log-probability [B, S] from the per-position CE of the position before it (0 at a row's
    first token, which nothing predicts)."""
    return torch.nn.functional.pad(-token_ce.view(shape)[:, :-1], (1, 0))


def likelihood_parts(logits: torch.Tensor, batch: dict[str, torch.Tensor], teacher_token_ce: torch.Tensor, alpha: float,
                     temperature: float, chunk_tokens: Optional[int] = None) -> tuple[LossParts, torch.Tensor]:
    """``(1 − α)·CE + α·D`` with D :func:`chunk_likelihood_loss`, at the memory of the chunked CE: D depends on the
    student's logits only through its tokens' log-probabilities, so its gradient is that of a CE weighted per
    position by ``−∂D/∂log p`` (one more chunked pass, no gradient, gives the log-probabilities first). Returns the
    parts and the number of chunks D averages."""
    labels, mask = batch["labels"], batch["mask"]
    with torch.no_grad():
        plain = distill_loss(logits, labels, mask, chunk_tokens=chunk_tokens)
    own = _shifted(plain.token_ce, labels.shape).requires_grad_()
    teacher = _shifted(teacher_token_ce, batch[CROSS + "input_ids"].shape)
    with torch.enable_grad():
        kd, n = chunk_kl(own, batch["student_chunk"], teacher, batch["teacher_chunk"], logits.shape[1], temperature)
        (per_token,) = torch.autograd.grad(kd, own) if kd.requires_grad else (torch.zeros_like(own),)
    per_position = torch.nn.functional.pad(-per_token[:, 1:], (0, 1))  # position t predicts token t + 1
    weights = (1 - alpha) * mask / mask.sum().clamp(min=1) + alpha * per_position
    value = (1 - alpha) * plain.ce + alpha * kd.detach()
    surrogate = weighted_ce(logits, labels, weights, chunk_tokens)
    return plain._replace(loss=surrogate + (value - surrogate).detach(), kd=kd.detach()), n
