"""codistill-bench-loss on tiny shapes: both kinds of rows run their two variants in their own
processes and agree (the figures of the real shapes are the tool's, not a test's)."""
import json

from conftest import bin_path, run_cmd


def test_logits_and_fused_linear_rows_agree_with_their_plain_paths(tmp_path):
    out = tmp_path / "rows.json"
    proc = run_cmd([bin_path("codistill-bench-loss"), "--shapes", "64x300", "--linear-shapes", "64x32x300",
                    "--divergences", "jsd", "--repeats", "1", "--out", str(out)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [(r["baseline"], r["variant"]) for r in rows] == [("reference", "chunked"), ("plain", "fused")]
    assert rows[1]["hidden"] == 32 and rows[1]["vocab"] == 300
    for row in rows:
        assert row["value_rel_err"] < 1e-5 and row["grad_rel_err"] < 1e-4
        assert row["chunked_ms"] > 0 and row["reference_own_peak_mb"] >= 0


def test_a_plain_path_killed_for_memory_still_gives_the_fused_row(tmp_path, monkeypatch, capsys):
    """Where the plain path does not fit the machine (its worker is killed), the row holds the fused figures
    and the free memory the plain path ran out of, instead of ending the benchmark."""
    import subprocess

    from codistill.commands import bench_loss

    real_run = subprocess.run

    def run(cmd, **kwargs):
        if "--worker" in cmd and cmd[cmd.index("--worker") + 1] == "plain":
            return subprocess.CompletedProcess(cmd, -9, "", "")
        return real_run(cmd, **kwargs)

    monkeypatch.setattr(bench_loss.subprocess, "run", run)
    out = tmp_path / "rows.json"
    assert bench_loss.main(["--shapes", "--linear-shapes", "64x32x300", "--divergences", "forward_kl",
                            "--repeats", "1", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["reference_killed_with_mb_free"] > 0 and row["chunked_ms"] > 0 and row["memory_ratio_below"] >= 0
    assert "the plain path ran out of" in capsys.readouterr().out


def test_top_k_rows_agree_with_the_coarsened_reference(tmp_path):
    """--top-k: the reference coarsens both distributions to the teacher's top-k + tail; the chunked and fused
    paths build top-k targets; both kinds of rows agree."""
    from codistill.commands import bench_loss

    out = tmp_path / "rows.json"
    assert bench_loss.main(["--shapes", "64x300", "--linear-shapes", "64x32x300", "--divergences", "forward_kl",
                            "--top-k", "8", "--repeats", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 2 and all(r["top_k"] == 8 for r in rows)
    for row in rows:
        assert row["value_rel_err"] < 1e-5 and row["grad_rel_err"] < 1e-4
