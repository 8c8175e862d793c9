"""The chunked distillation loss against a plain PyTorch reference, side by side.

For each (tokens, vocab) shape (--shapes) and divergence, runs each variant in its own process:
  reference  fp32 log_softmax of both models over the whole [tokens x vocab] tensor,
             the divergence from its formula, autograd backward;
  chunked    codistill.losses.distill_loss (α = 1: the soft term alone, like the reference).
Each process first allocates what both variants must hold anyway: the student's and
the teacher's logits and a gradient-sized buffer. Its peak RSS after that is its
baseline; the variant's own peak memory is its peak RSS at the end minus that baseline.

For each (tokens, hidden, vocab) shape (--linear-shapes), the same from final hidden states
and LM-head weights of both models:
  plain      matmul -> the reference above -> autograd (the logits are the variant's own);
  fused      codistill.fused.fused_linear_losses (no [tokens x vocab] tensor; the teacher's
             CE comes out of the same pass).
What both hold is the inputs and the gradients of the student's hidden states and head.
With --top-k K both variants distil to the teacher's top-K tokens + one tail bucket (the reference
coarsens its whole-tensor log-softmaxes; the chunked and fused paths build top-k targets, inside the
timed pass). Times are the best of --repeats forward+backward passes. Values and gradients are
compared between the two processes (loss value; every row's gradient sum and norm; and
a fixed sample of full gradient rows).

    python tools/bench_loss.py [--shapes 4096x50257 4096x128256] [--divergences forward_kl jsd]
    python tools/bench_loss.py --shapes --linear-shapes 4096x2048x128256 4096x2048x50257   (fused rows only)
    python tools/bench_loss.py --shapes 4096x50257 --divergences forward_kl --top-k 64   (top-k targets)
    python tools/bench_loss.py --shapes --linear-shapes 4096x4096x128256 --device cuda --dtype bf16   (on a GPU)
    codistill-bench-loss ...   (the same, as a console command)
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional, get_args

from .. import cli
from ..config import DistillConfig

if TYPE_CHECKING:
    import torch

    from ..losses import Targets

SAMPLE_ROWS = 32
# The config's names (losses.DIVERGENCES), read without importing the losses, and torch with them, for a --help.
DIVERGENCES = get_args(DistillConfig.model_fields["divergence"].annotation)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def reference_loss(student: torch.Tensor, teacher: torch.Tensor, div: str, beta: float, temp: float,
                   top_k: Optional[int] = None) -> torch.Tensor:
    """The naive soft loss: whole-tensor fp32 softmaxes, autograd does the rest; with ``top_k``, both
    distributions coarsened to the teacher's top-k tokens + one tail bucket first."""
    import torch
    import torch.nn.functional as F

    log_q = F.log_softmax(student / temp, dim=-1)
    log_p = F.log_softmax(teacher / temp, dim=-1)
    if top_k:
        ids = log_p.topk(top_k, dim=-1).indices

        def buckets(log_x: torch.Tensor) -> torch.Tensor:
            tail = log_x.scatter(1, ids, -math.inf).logsumexp(dim=-1, keepdim=True)
            return torch.cat([log_x.gather(1, ids), tail], dim=1)

        log_p, log_q = buckets(log_p), buckets(log_q)
    if div == "jsd" and beta in (0.0, 1.0):
        div = "forward_kl" if beta == 0.0 else "reverse_kl"
    if div == "forward_kl":
        per_row = (log_p.exp() * (log_p - log_q)).sum(-1)
    elif div == "reverse_kl":
        per_row = (log_q.exp() * (log_q - log_p)).sum(-1)
    elif div == "jsd":
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1 - beta))
        per_row = beta * (log_p.exp() * (log_p - log_m)).sum(-1) + (1 - beta) * (log_q.exp() * (log_q - log_m)).sum(-1)
    else:
        per_row = 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    return per_row.mean() * temp**2


def targets_of(teacher: torch.Tensor, temp: float, top_k: Optional[int]) -> Targets:
    """The chunked path's soft targets: the teacher's logits, or its top-k + tail (computed here, timed)."""
    from ..losses import Targets, topk_targets

    return topk_targets(teacher, top_k, temp) if top_k else Targets(temperature=temp, logits=teacher)


def worker(variant: str, tokens: int, vocab: int, div: str, beta: float, temp: float, repeats: int, out: Path,
           top_k: Optional[int] = None) -> None:
    import torch

    from ..losses import SoftSpec, distill_loss

    torch.manual_seed(0)
    student = (torch.randn(tokens, vocab) * 2).requires_grad_(True)
    teacher = torch.randn(tokens, vocab) * 2
    labels = torch.randint(0, vocab, (tokens,))
    mask = torch.ones(tokens, dtype=torch.bool)
    must_hold = torch.ones_like(student)  # the gradient w.r.t. the student's logits, held by both variants
    del must_hold
    baseline = peak_rss_bytes()
    spec = SoftSpec(divergence=div, beta=beta, alpha=1.0)
    times, value = [], None
    for _ in range(repeats):
        student.grad = None
        start = time.perf_counter()
        if variant == "reference":
            loss = reference_loss(student, teacher, div, beta, temp, top_k)
        else:
            loss = distill_loss(student, labels, mask, targets_of(teacher, temp, top_k), spec).loss
        loss.backward()
        times.append(time.perf_counter() - start)
        value = loss.item()
        del loss
    own_peak = peak_rss_bytes() - baseline  # before the checks below allocate anything
    grad = student.grad.double()
    rows = torch.linspace(0, tokens - 1, SAMPLE_ROWS).long()
    torch.save({"value": value, "time": min(times), "own_peak": own_peak,
                "baseline": baseline, "row_sum": grad.sum(-1), "row_norm": grad.norm(dim=-1),
                "sample": student.grad[rows].clone()}, out)


def linear_worker(variant: str, tokens: int, hidden: int, vocab: int, div: str, beta: float, temp: float,
                  repeats: int, out: Path, device: str = "cpu", dtype: str = "fp32",
                  top_k: Optional[int] = None) -> None:
    """One variant from hidden states and heads: the student's h and W train, the teacher's are fixed.
    On a GPU the memory is the peak allocated above the inputs; in bf16 the plain path's logits are
    bf16 and its softmaxes fp32 (as a model's loss upcasts them), the fused path's chunks fp32."""
    import torch

    from ..fused import Head, StudentTerm, fused_linear_losses
    from ..losses import SoftSpec

    torch.manual_seed(0)
    on, kind = torch.device(device), {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    scale = 2.0 / math.sqrt(hidden)  # logits of about the same spread as the logits rows (sd 2)
    h_s, h_t = torch.randn(tokens, hidden), torch.randn(tokens, hidden)
    w_s, w_t = torch.randn(vocab, hidden) * scale, torch.randn(vocab, hidden) * scale
    h_s, h_t, w_s, w_t = (t.to(on, kind) for t in (h_s, h_t, w_s, w_t))
    h_s.requires_grad_(True)
    w_s.requires_grad_(True)
    labels = torch.randint(0, vocab, (tokens,)).to(on)
    mask = torch.ones(tokens, dtype=torch.bool, device=on)
    must_hold = (torch.ones_like(h_s), torch.ones_like(w_s))  # the gradients both variants hand back
    del must_hold
    gpu = on.type == "cuda"
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated() if gpu else peak_rss_bytes()
    spec = SoftSpec(divergence=div, beta=beta, alpha=1.0)
    times, value = [], None
    for _ in range(repeats):
        h_s.grad = w_s.grad = None
        if gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        if variant == "plain":
            loss = reference_loss((h_s @ w_s.t()).float(), (h_t @ w_t.t()).float(), div, beta, temp, top_k)
        else:
            _, (parts,) = fused_linear_losses(Head(h_t, w_t), [StudentTerm(Head(h_s, w_s), spec, temp, top_k)],
                                              labels, mask, vocab)
            loss = parts.loss
        loss.backward()
        if gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        value = loss.item()
        del loss
    own_peak = (torch.cuda.max_memory_allocated() if gpu else peak_rss_bytes()) - baseline
    rows_h = torch.linspace(0, tokens - 1, SAMPLE_ROWS).long()
    rows_w = torch.linspace(0, vocab - 1, SAMPLE_ROWS).long()
    torch.save({"value": value, "time": min(times), "own_peak": own_peak, "baseline": baseline,
                "row_sum": torch.cat([h_s.grad.double().sum(-1), w_s.grad.double().sum(-1)]),
                "row_norm": torch.cat([h_s.grad.double().norm(dim=-1), w_s.grad.double().norm(dim=-1)]),
                "sample": torch.cat([h_s.grad[rows_h].flatten(), w_s.grad[rows_w].flatten()])}, out)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def dims(form: str):
    """An argparse type for shapes written ``form`` (e.g. TOKENSxVOCAB): that many positive numbers."""
    def parse(text: str) -> tuple[int, ...]:
        try:
            parts = tuple(int(x) for x in text.lower().split("x"))
            if len(parts) == form.count("x") + 1 and min(parts) >= 1:
                return parts
        except ValueError:
            pass
        raise argparse.ArgumentTypeError(f"expected {form} with positive numbers, got '{text}'")
    parse.__name__ = form  # argparse names the type in its own errors
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser_for("codistill-bench-loss", __doc__, config=False)
    parser.add_argument("--shapes", nargs="*", type=dims("TOKENSxVOCAB"), default=[(4096, 50257), (4096, 128256)],
                        help="TOKENSxVOCAB ... (none: no logits rows)")
    parser.add_argument("--linear-shapes", nargs="*", type=dims("TOKENSxHIDDENxVOCAB"), default=[],
                        help="TOKENSxHIDDENxVOCAB ...: fused-linear rows (e.g. 4096x2048x128256)")
    parser.add_argument("--divergences", nargs="+", default=["forward_kl", "jsd"], choices=DIVERGENCES)
    parser.add_argument("--beta", type=float, default=0.5, help="β for jsd (default 0.5)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=cli.positive_int, default=None,
                        help="top-k targets (the teacher's k most likely tokens + a tail bucket; default: full)")
    parser.add_argument("--repeats", type=cli.positive_int, default=2, help="timed passes per variant; the best counts")
    parser.add_argument("--out", help="also write the figures as JSON here")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the TOKENSxHIDDENxVOCAB rows run (memory on a GPU: peak allocated)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="the hidden states' and heads' dtype in the TOKENSxHIDDENxVOCAB rows")
    parser.add_argument("--worker", nargs=3, metavar=("VARIANT", "SHAPE", "FILE"), help=argparse.SUPPRESS)
    parser.add_argument("--divergence", help=argparse.SUPPRESS)
    return parser


def body(args: argparse.Namespace) -> int:
    if args.worker:
        run_worker(args)
        return 0
    results = []
    print(f"{'shape':>20} {'divergence':>10} | {'ref ms':>8} {'ours ms':>8} {'time':>6} | "
          f"{'ref MB':>8} {'ours MB':>8} {'memory':>7} | {'value rel':>9} {'grad rel':>9}")
    rows = [(f"{t}x{v}", {"tokens": t, "vocab": v}, LOGITS) for t, v in args.shapes]
    rows += [(f"{t}x{h}x{v}", {"tokens": t, "hidden": h, "vocab": v}, LINEAR) for t, h, v in args.linear_shapes]
    with tempfile.TemporaryDirectory() as tmp:
        for shape, sizes, kind in rows:
            for div in args.divergences:
                figures = run_variants(args, shape, kind, div, Path(tmp))
                if figures is None:
                    return 1
                ref, ours = (figures[variant] for variant in kind)
                if ref.get("killed"):  # what is known: the plain path needed more than the machine had free
                    row = killed_row(args, sizes, div, kind, ref, ours)
                    print(f"{shape:>20} {div:>10} | {'killed':>8} {row['chunked_ms']:8.0f} {'':>6} | "
                          f"{'>' + format(row['reference_killed_with_mb_free'], '.0f'):>8} "
                          f"{row['chunked_own_peak_mb']:8.0f} {'<' + format(row['memory_ratio_below'], '.3f'):>6}x | "
                          f"(the plain path ran out of {row['reference_killed_with_mb_free']:.0f} MB free)")
                else:
                    row = compared_row(args, sizes, div, kind, ref, ours)
                    print(f"{shape:>20} {div:>10} | {row['reference_ms']:8.0f} {row['chunked_ms']:8.0f} "
                          f"{row['time_ratio']:5.2f}x | {row['reference_own_peak_mb']:8.0f} "
                          f"{row['chunked_own_peak_mb']:8.0f} {row['memory_ratio']:6.3f}x | "
                          f"{row['value_rel_err']:9.1e} {row['grad_rel_err']:9.1e}")
                results.append(row)
    print(f"memory ({'peak allocated' if args.device == 'cuda' else 'peak RSS'} for the fused rows): peak above what "
          "both variants hold (logits rows: both models' logits and their gradient; "
          "TOKENSxHIDDENxVOCAB rows: hidden states, heads and their gradients, so the plain path's logits count); "
          "time: best forward+backward; grad rel: max |Δ| / max |ref| over "
          f"{SAMPLE_ROWS} sampled rows and every row's norm (fused rows: hidden states and head weight)")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def run_worker(args: argparse.Namespace) -> None:
    """One variant at one shape, in this process (``--worker VARIANT SHAPE FILE``): its figures go to FILE."""
    variant, shape, file = args.worker
    sizes = [int(x) for x in shape.split("x")]
    if variant in LINEAR:
        linear_worker(variant, *sizes, args.divergence, args.beta, args.temperature, args.repeats, Path(file),
                      args.device, args.dtype, args.top_k)
    else:
        worker(variant, *sizes, args.divergence, args.beta, args.temperature, args.repeats, Path(file), args.top_k)


def run_variants(args: argparse.Namespace, shape: str, kind: tuple[str, str], div: str,
                 tmp: Path) -> Optional[dict[str, dict]]:
    """The figures of both variants of ``kind`` (:data:`LOGITS` or :data:`LINEAR`) at ``shape``, each run in a
    process of its own; for a plain path killed for memory, ``{"killed": True, "available": bytes free}``.
    None, after an error line, when a worker failed otherwise."""
    import torch

    base = kind[0]
    figures = {}
    for variant in kind:
        file = tmp / f"{variant}.pt"
        cmd = [*cli.module_command("codistill.commands.bench_loss"), "--worker", variant, shape, str(file),
               "--divergence", div, "--beta", str(args.beta), "--temperature", str(args.temperature),
               "--repeats", str(args.repeats), "--device", args.device, "--dtype", args.dtype,
               *(["--top-k", str(args.top_k)] if args.top_k else [])]
        available = available_bytes(args.device if kind == LINEAR else "cpu")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=cli.child_env())
        out_of_memory = proc.returncode < 0 or "OutOfMemoryError" in proc.stderr
        if out_of_memory and variant == base:  # the plain path does not fit this machine
            figures[variant] = {"killed": True, "available": available}
            continue
        if proc.returncode != 0:
            print(f"codistill-bench-loss: error: the {variant} worker failed at {shape} {div}: "
                  f"{(proc.stderr.strip().splitlines() or ['killed (out of memory?)'])[-1]}", file=sys.stderr)
            return None
        figures[variant] = torch.load(file)
    return figures


def killed_row(args: argparse.Namespace, sizes: dict[str, int], div: str, kind: tuple[str, str], ref: dict,
               ours: dict) -> dict:
    """The row of a shape whose plain path was killed for memory: our variant's figures (ms, MB) and the
    memory (MB) the plain path ran out of."""
    return {**sizes, "divergence": div, "beta": args.beta, "baseline": kind[0], "variant": kind[1],
            "reference_killed_with_mb_free": ref["available"] / 2**20, "chunked_ms": ours["time"] * 1e3,
            "chunked_own_peak_mb": ours["own_peak"] / 2**20,
            "memory_ratio_below": ours["own_peak"] / max(ref["available"], 1)}


def compared_row(args: argparse.Namespace, sizes: dict[str, int], div: str, kind: tuple[str, str], ref: dict,
                 ours: dict) -> dict:
    """The row of a shape both variants ran at: times (ms, tokens/s), own peak memory (MB), their ratios and
    how far our value and gradients are from the plain path's."""
    linear = kind == LINEAR
    return {
        **sizes, "divergence": div, "beta": args.beta, "top_k": args.top_k, "baseline": kind[0],
        "variant": kind[1],
        "reference_ms": ref["time"] * 1e3, "chunked_ms": ours["time"] * 1e3,
        "reference_tokens_per_sec": sizes["tokens"] / ref["time"],
        "chunked_tokens_per_sec": sizes["tokens"] / ours["time"],
        "device": args.device if linear else "cpu", "dtype": args.dtype if linear else "fp32",
        "time_ratio": ours["time"] / ref["time"],
        "reference_own_peak_mb": ref["own_peak"] / 2**20, "chunked_own_peak_mb": ours["own_peak"] / 2**20,
        "memory_ratio": ours["own_peak"] / max(ref["own_peak"], 1),
        "value_rel_err": abs(ours["value"] - ref["value"]) / abs(ref["value"]),
        "grad_rel_err": max(rel(ours["sample"].double(), ref["sample"].double()),
                            rel(ours["row_norm"], ref["row_norm"])),
        "row_sum_abs_err": float((ours["row_sum"] - ref["row_sum"]).abs().max()),
    }


def available_bytes(device: str = "cpu") -> int:
    """Memory a new process could take now: the GPU's free memory, or the kernel's MemAvailable (0 where
    unknown)."""
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


LOGITS = ("reference", "chunked")  # the variants of a TOKENSxVOCAB row
LINEAR = ("plain", "fused")  # of a TOKENSxHIDDENxVOCAB row


def main(argv: Optional[list[str]] = None) -> int:
    return cli.run("codistill-bench-loss", build_parser(), body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
