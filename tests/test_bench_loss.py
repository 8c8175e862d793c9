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
