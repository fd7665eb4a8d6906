"""The quickstart a new user runs first: `rhn train` with the default config."""

from __future__ import annotations

import json
import re

from rhn_cli.cli import cli


def test_quickstart_gets_within_ten_percent_of_the_source_entropy(runner, tmp_path):
    result = runner.invoke(cli, ["train", "--name", "quickstart"])
    assert result.exit_code == 0, result.output

    epoch_lines = [line for line in result.output.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 4
    for line in epoch_lines:
        assert re.search(r"train ppl +[\d.]+ bits [\d.]+ +valid ppl +[\d.]+ bits [\d.]+", line)
        assert "source entropy" in line

    run_dir = tmp_path / "runs" / "1"
    run = json.loads((run_dir / "run.json").read_text())
    info = json.loads((run_dir / "info.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert run["status"] == "COMPLETED"
    assert json.loads((run_dir / "config.json").read_text())["dataset"] == "synthetic"

    entropy = info["source_entropy_bits"]
    last_valid_bits = metrics["valid.bpc"]["values"][-1]
    assert entropy < last_valid_bits < 1.10 * entropy, (last_valid_bits, entropy)

    # The recorded stdout holds each epoch line once, not the progress bar's redraws.
    captured = (run_dir / "cout.txt").read_text()
    assert captured.count("epoch   1/4") == 1
    assert "\r" not in captured
