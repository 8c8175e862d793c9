"""Models that teach each other: peers (mode mutual) and a teacher that listens to its students."""
import json
import math

import pytest
import torch

from codistill.commands.compare_mutual import arm_runs, larger, report, steps_to_reach
from codistill.config import MUTUAL_DEFAULTS, ConfigError, RunConfig, dump_config, load_config, validate
from codistill.fused import Head, Term, fused_losses
from codistill.losses import SoftSpec, Targets, distill_loss, next_token_targets
from codistill.mixture import Mixture, mixture_ce, position_ce

from conftest import MICRO, ROOT, after, launch, read_layout, read_scalars, resumed_beside

PEER = ("{name: %s, config: {hidden_size: %d, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, "
        "num_key_value_heads: 2, max_position_embeddings: 64}, deepspeed: {zero_optimization: {stage: %d}, "
        "optimizer: {type: AdamW, params: {lr: 3.0e-3}}, gradient_clipping: 1.0}}")
THREE_PEERS = ["mode=mutual", "teacher=null", "distill.schedule=warmup",  # a ramp: every peer listens
               "students=[%s]" % ", ".join(PEER % (n, h, z) for n, h, z in (("p1", 32, 2), ("p2", 48, 2), ("p3", 32, 3)))]
# the gates measure at steps 1, 3, 5, 7 (the split at 4 carries their state), α ramps over steps 2-3
GATED = ["train.max_steps=8", "distill.burn_in_steps=1", "distill.warmup_steps=2", "distill.benefit_interval=2",
         "distill.benefit_init=0.5", "train.panel_interval=4", "train.eval_interval=4"]
LISTENING = ["teacher.distill={schedule: warmup, burn_in_steps: 1, warmup_steps: 2, benefit_interval: 2}",
             "distill.head_start_steps=0"]


# --------------------------------------------------------------------------- the target: an average of sources

def test_a_mixture_is_the_average_of_its_sources_probabilities_at_t():
    torch.manual_seed(0)
    z = [torch.randn(2, 5, 11) for _ in range(3)]
    for t in (1.0, 2.0):
        got = Mixture(z, t).reshape(-1, 11)
        expected = torch.stack([torch.softmax(x / t, -1) for x in z]).mean(0).reshape(-1, 11)
        torch.testing.assert_close(torch.softmax(got[0:10] / t, -1), expected)
        torch.testing.assert_close(torch.cat([got[0:4], got[4:10]]), got[0:10])  # read by row slices
        assert got.numel() == 110 and got.dim() == 2
    labels = torch.randint(0, 11, (10,))
    ces = [position_ce(x, labels, 3) for x in z]
    p = torch.stack([torch.softmax(x.reshape(-1, 11), -1) for x in z]).mean(0)
    torch.testing.assert_close(mixture_ce(ces), -torch.log(p.gather(1, labels[:, None]).squeeze(1)))
    with pytest.raises(ValueError, match="two or more sources"):
        Mixture(z[:1], 1.0)


def test_the_fused_pass_over_peers_equals_each_loss_from_logits_with_its_gradients():
    """Three peers, each reading the other two (one on top-k targets, one with the token filter), and one
    reading a single peer: every loss and gradient as distill_loss gives it from the logits."""
    torch.manual_seed(1)
    h, v = 8, 17
    ids = torch.randint(0, v, (2, 7))
    labels, mask = next_token_targets(ids, torch.ones_like(ids))
    hidden = [torch.randn(2, 7, h, requires_grad=True) for _ in range(3)]
    weights = [torch.randn(v, h, requires_grad=True) for _ in range(3)]
    specs = [SoftSpec(divergence="forward_kl", alpha=0.5), SoftSpec(divergence="reverse_kl", alpha=0.3),
             SoftSpec(divergence="jsd", alpha=0.7, token_filter=True)]
    terms = [Term([1, 2], specs[0], 2.0), Term([0, 2], specs[1], 1.0, top_k=5), Term([0], specs[2], 1.0)]
    parts = fused_losses([Head(x, w) for x, w in zip(hidden, weights)], terms, labels, mask, v, chunk_tokens=5)
    fused_grads = []
    for p, x, w in zip(parts, hidden, weights):
        p.loss.backward()
        fused_grads.append((x.grad.clone(), w.grad.clone()))
        x.grad = w.grad = None
    logits = [x @ w.t() for x, w in zip(hidden, weights)]
    for k, (term, p) in enumerate(zip(terms, parts)):
        sources = [logits[j].detach() for j in term.sources]
        src = sources[0] if len(sources) == 1 else Mixture(sources, term.temperature)
        token_ce = (position_ce(sources[0], labels, 4) if len(sources) == 1
                    else mixture_ce([position_ce(s, labels, 4) for s in sources]))
        if term.top_k is None:
            targets = Targets(temperature=term.temperature, logits=src, token_ce=token_ce)
        else:
            from codistill.losses import topk_targets
            from dataclasses import replace
            targets = replace(topk_targets(src, term.top_k, term.temperature), token_ce=token_ce)
        ref = distill_loss(logits[k], labels, mask, targets, term.spec)
        torch.testing.assert_close(p.loss, ref.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p.kd, ref.kd, rtol=1e-5, atol=1e-6)
        ref.loss.backward(inputs=[hidden[k], weights[k]])
        torch.testing.assert_close(fused_grads[k][0], hidden[k].grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(fused_grads[k][1], weights[k].grad, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- the config

def tree(**extra):
    base = {"mode": "mutual", "students": [{"name": n, "deepspeed": {}} for n in ("a", "b", "c")]}
    return {**base, **extra}


def test_mutual_mode_takes_peers_only_and_gives_them_its_own_defaults():
    cfg = validate(tree(), "t")
    assert [(s.name, sources) for s, _, sources in cfg.learners()] == [("a", ["b", "c"]), ("b", ["a", "c"]),
                                                                       ("c", ["a", "b"])]
    d = cfg.distill_for(0)
    assert {k: getattr(d, k) for k in MUTUAL_DEFAULTS} == MUTUAL_DEFAULTS
    given = validate(tree(distill={"schedule": "constant"}, students=[
        {"name": "a", "deepspeed": {}, "distill": {"burn_in_steps": 3}}, {"name": "b", "deepspeed": {}, "sources": []}]),
        "t")
    assert given.distill_for(0).schedule == "constant" and given.distill_for(0).burn_in_steps == 3
    assert given.distill_for(1).burn_in_steps == MUTUAL_DEFAULTS["burn_in_steps"]
    assert [sources for *_, sources in given.learners()] == [["b"], []]
    for bad, message in [
        (tree(teacher={"name": "t", "deepspeed": {}}), "mode=mutual has no teacher"),
        (tree(students=[{"name": "a", "deepspeed": {}}]), "needs two or more students"),
        (tree(students=[{"name": "a", "deepspeed": {}, "sources": ["z"]}, {"name": "b", "deepspeed": {}}]),
         "a.sources: 'z' is not another peer of this run"),
        (tree(students=[{"name": "a", "deepspeed": {}, "sources": ["a"]}, {"name": "b", "deepspeed": {}}]),
         "a.sources: 'a' is not another peer"),
        (tree(students=[{"name": "a", "deepspeed": {}, "sources": ["b", "b"]}, {"name": "b", "deepspeed": {}}]),
         "names a model twice"),
        ({"mode": "codistill", "students": [{"name": "a", "deepspeed": {}}]}, "'teacher' is required in mode=codistill"),
    ]:
        with pytest.raises(ConfigError, match=message):
            validate(bad, "t")


def test_a_teacher_listens_only_when_given_a_distill_section_and_only_in_codistill():
    deaf = load_config(MICRO)
    assert not deaf.listening and [s.name for s, *_ in deaf.learners()] == ["student"]
    again = validate(__import__("yaml").safe_load(dump_config(deaf)), "dump")  # the written config stays deaf
    assert not again.listening
    heard = load_config(MICRO, ["teacher.distill={}"])
    assert heard.listening and [(s.name, src) for s, _, src in heard.learners()] == [("teacher", ["student"]),
                                                                                       ("student", ["teacher"])]
    assert heard.learners()[0][1].head_start_steps == heard.distill.head_start_steps  # the students' defaults
    for bad in (["mode=soft", "teacher.config={}", "teacher.pretrained=/x", "teacher.distill={}"],
                ["mode=hard", "teacher.distill={alpha_max: 0.1}"]):
        with pytest.raises(ConfigError, match="a teacher listens to its students only in mode codistill"):
            load_config(MICRO, bad)
    with pytest.raises(ConfigError, match="students\\[student\\].sources: a student distils from the teacher"):
        load_config(MICRO, ["students.0.sources=[teacher]"])


# --------------------------------------------------------------------------- the evidence's arms

def test_the_mutual_arms_pair_every_peer_with_an_equal_twin_and_read_steps_to_reach():
    base = load_config(ROOT / "configs" / "tiny.yaml").model_dump(mode="json")
    runs = arm_runs(base, 5, ROOT / "x", ["peers", "large", "handicap", "listening"], 0.1, {"schedule": "warmup"})
    assert sorted(runs) == ["deaf", "handicap", "large", "listening", "peers"]
    peers = runs["peers"]
    assert peers["mode"] == "mutual" and "teacher" not in peers
    assert [(s["name"], s["sources"], s["init_seed"]) for s in peers["students"]] == [
        ("peer_a", ["peer_b"], 6), ("peer_b", ["peer_a"], 7), ("peer_a_alone", [], 6), ("peer_b_alone", [], 7)]
    assert not set(MUTUAL_DEFAULTS) & set(peers["distill"])  # mode mutual's defaults apply
    cfg = RunConfig.model_validate(peers)
    assert cfg.distill_for(0).schedule == MUTUAL_DEFAULTS["schedule"]
    lrs = [s["deepspeed"]["optimizer"]["params"]["lr"] for s in runs["handicap"]["students"]]
    assert lrs[1] == lrs[3] == pytest.approx(lrs[0] * 0.1) and lrs[0] == lrs[2]
    assert larger({"hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 3}) == {
        "hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 5}
    assert runs["listening"]["teacher"]["distill"] == {"schedule": "warmup"}
    assert runs["deaf"]["teacher"].get("distill") is None
    assert [s["name"] for s in runs["listening"]["students"]] == ["student"]
    ramp = arm_runs(base, 5, ROOT / "x", ["peers"], 0.1, {}, {"schedule": "warmup", "alpha_max": 0.5})["peers"]
    assert ramp["distill"]["schedule"] == "warmup" and RunConfig.model_validate(ramp).distill_for(1).alpha_max == 0.5
    assert steps_to_reach({0: 8.0, 50: 6.0, 100: 5.0}, 5.5) == pytest.approx(75.0)
    assert steps_to_reach({0: 8.0, 50: 6.0}, 5.0) == math.inf
    results = {"c": {1: {"peers/peer_a": {"final": 5.0, "twin": 5.1, "share": 0.6},
                         "peers/peer_b": {"final": 5.05, "twin": 5.1, "share": 0.8},
                         "listening/teacher": {"final": 4.0, "twin": 4.02, "share": 1.0},
                         "listening/student": {"final": 5.0, "twin": 4.99, "share": 1.0}}}}
    text, ok = report(results, [1], "cmd", "m", {"schedule": "warmup"}, 0.1)
    assert not ok and "every peer below its twin on every corpus and seed: **yes**" in text
    assert "student − the one-way run's worst +0.0100 (≤ 0.005)" in text and "**no**" in text


# --------------------------------------------------------------------------- runs on two ranks

def two_ranks(out, *overrides, **kw):
    return launch(f"output_dir={out}", *GATED, *overrides, **kw)


@pytest.fixture(scope="module")
def three_peers(tmp_path_factory):
    """Three peers of two sizes (one at ZeRO-3) on two ranks, straight; and continued from its step 4."""
    root = tmp_path_factory.mktemp("peers")
    straight = two_ranks(root / "straight", *THREE_PEERS, "checkpoint.interval=4")
    resumed = resumed_beside(root / "straight", 4, root / "split", *GATED, *THREE_PEERS)
    return root, straight.stdout, resumed.stdout


def test_three_peers_train_each_from_the_others_with_every_tag_finite_and_gates_moving(three_peers):
    root, out, _ = three_peers
    tb = read_scalars(root / "straight")
    for peer in ("p1", "p2", "p3"):
        for tag in ("train/loss", "train/loss_ce", "train/loss_kd", "eval/loss"):
            values = list(tb[f"{peer}/{tag}"].values())
            assert values and all(math.isfinite(v) for v in values), (peer, tag)
        alpha = tb[f"schedule/alpha/{peer}"]
        assert alpha[1] == 0.0 and alpha[4] > 0  # the burn-in, then the ramp (x the gate's openness)
        opens = list(tb[f"benefit/openness/{peer}"].values())
        assert len(set(opens)) > 1, opens  # the gate measured and moved
        assert all(math.isfinite(v) for v in tb[f"distill/teacher_lead/{peer}"].values())
        assert f"distill/teacher_entropy/{peer}" in tb  # each peer's own sources, not one teacher
    assert "p1: distils from step 1 of 8 (from p2 + p3; head start 0, burn-in 1); warmup alpha" in out
    layout = read_layout(root / "straight")
    assert len(layout["validation loss, every model"]) == 3
    assert "p3: benefit gate (openness, signal, evidence) and alpha" in layout


def test_three_peers_resume_exactly(three_peers):
    root, _, resumed = three_peers
    assert "resumed from" in resumed and "at step 4" in resumed
    straight, split = after(read_scalars(root / "straight"), 4), read_scalars(root / "split")
    for peer in ("p1", "p2", "p3"):
        for tag in (f"{peer}/train/loss", f"{peer}/train/loss_kd", f"schedule/alpha/{peer}",
                    f"benefit/openness/{peer}", f"schedule/lead/{peer}"):
            assert split[tag] == straight[tag] and sorted(split[tag]) == [5, 6, 7, 8], tag


@pytest.fixture(scope="module")
def listening(tmp_path_factory):
    """A teacher listening to its student, on the fused-linear path with the teacher at ZeRO-3 (each head
    gathered from the pass to its own backward), on two ranks: straight, and continued from its step 4."""
    root = tmp_path_factory.mktemp("listening")
    common = [*LISTENING, "distill.fused_linear=true", "teacher.deepspeed.zero_optimization.stage=3"]
    straight = two_ranks(root / "straight", *common, "checkpoint.interval=4")
    resumed_beside(root / "straight", 4, root / "split", *GATED, *common)
    return root, straight.stdout


def test_a_listening_teacher_distils_from_its_student_gated_and_resumes_exactly(listening):
    root, out = listening
    assert "teacher: distils from step 1 of 8 (from student; head start 0, burn-in 1)" in out
    tb, split = read_scalars(root / "straight"), read_scalars(root / "split")
    for name in ("teacher", "student"):
        for tag in ("train/loss_kd", "train/loss_ce"):
            assert all(math.isfinite(v) for v in tb[f"{name}/{tag}"].values())
        assert tb[f"schedule/alpha/{name}"][4] > 0
        assert len(set(tb[f"benefit/openness/{name}"].values())) > 1
        for tag in (f"{name}/train/loss", f"schedule/alpha/{name}", f"benefit/openness/{name}"):
            assert split[tag] == after(tb, 4)[tag] and sorted(split[tag]) == [5, 6, 7, 8], tag


def test_every_target_is_taken_before_any_model_steps(tmp_path):
    """Peers (a mixture of two) and a listening teacher: within each step every forward runs before the
    first optimizer step, and every target equals the average of its sources' predictions before the step."""
    for name, overrides in (("peers", THREE_PEERS), ("listening", LISTENING)):
        out = tmp_path / name
        launch(f"output_dir={out}", "distill.burn_in_steps=0", "distill.schedule=constant", "distill.benefit_gate=false",
               "distill.fused_linear=false", *overrides,
               *(["teacher.distill={schedule: constant, burn_in_steps: 0, benefit_gate: false}"] if name == "listening"
                 else []),
               script=str(ROOT / "tests" / "helpers" / "record_order.py"), config=None)
        for rank in (0, 1):
            record = json.loads((out / f"rank{rank}.json").read_text())
            segments, current = [], None
            for event in record["events"]:
                if event.startswith("train_step"):
                    current = []
                    segments.append(current)
                elif event == "end":
                    current = None
                elif current is not None:
                    current.append(event)
            assert len(segments) == 4
            for events in segments:
                forwards = [n for n, e in enumerate(events) if e.startswith("forward")]
                steps = [n for n, e in enumerate(events) if e.startswith("step")]
                assert forwards and steps and max(forwards) < min(steps), events
            assert len(record["checks"]) >= 4 * (3 if name == "peers" else 2) and max(record["checks"]) < 1e-5
