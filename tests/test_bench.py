"""`mlapipe bench` on a tiny GGUF file on CPU: the llama-bench-style table, decode rounds swept."""

import re

from mlapipe.runtime.cli import main
from mlapipe.runtime.tiny_models import write_tiny_model


def test_bench_prints_a_row_per_setting_and_test(tmp_path, capsys):
    path = write_tiny_model(tmp_path / "v2.gguf", "v2", seed=3)
    argv = ["bench", "-m", str(path), "-p", "16", "-n", "9", "-gp", "20,5", "--concurrent", "1,3"]
    argv += ["--decode-steps", "1,4", "-r", "2", "--devices", "cpu"]
    assert main(argv) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[2:]]  # after the header
    # columns: model, wtype, pipeline, ubatch, amb, steps, seqs, test, t/s
    assert {(r[5], r[6], r[7]) for r in rows} == {
        (steps, seqs, test) for steps in ("1", "4") for seqs in ("1", "3") for test in ("pp16", "tg9", "tg5@d20")
    }
    for row in rows:
        mean, spread = (float(v) for v in re.fullmatch(r"([\d.]+) ± ([\d.]+)", row[8]).groups())
        assert mean > 0 and spread >= 0


def test_bench_compares_weight_types_of_a_named_shape_in_one_run(capsys):
    argv = ["bench", "--shape", "v3-tiny", "--wtype", "q8_0,UD-Q2_K_XL", "-p", "8", "-n", "2", "-r", "1"]
    assert main([*argv, "--devices", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("|")]
    assert {(r[0], r[1], r[7]) for r in rows[2:]} == {
        ("v3-tiny", wtype, test) for wtype in ("q8_0", "UD-Q2_K_XL") for test in ("pp8", "tg2")
    }
    # memory per stage: the planned weight bytes differ by type (allocated bytes are measured on GPUs only)
    planned = re.findall(r"memory of v3-tiny (\S+) .*\n  stage 0: weights planned ([\d.]+) GiB", out)
    assert [w for w, _ in planned] == ["q8_0", "UD-Q2_K_XL"]
    assert float(planned[0][1]) > float(planned[1][1]) > 0
