"""`python -m ivt.summary`: the table and the paper's rows beside ours."""
import subprocess
import sys

import pytest

from ivt import summary
from ivt.summary import paper_table


def test_paper_rows_match_except_the_documented_one():
    rows = paper_table()
    assert len(rows) == 26
    mismatched = [r["setting"] for r in rows if not r["match"]]
    assert mismatched == ["P_E-IR"]          # 6.05M in the paper; explained in NOTES


def test_cli_prints_breakdown_and_paper_table():
    out = subprocess.run([sys.executable, "-m", "ivt.summary", "--backbone", "swin_l", "--d2", "32",
                          "--paper"], capture_output=True, text=True, check=True).stdout
    assert "trainable (#TP)                      3,446,212" in out
    assert "HA linears (down, up)" in out and "Table 5(b)" in out and "off by one" in out


def test_options_of_another_tuning_are_usage_errors(capsys):
    """An option the counted model does not have is refused with a usage error (it was a
    traceback under --tuning full, and silently ignored under --tuning ivt)."""
    for argv, message in [(["--tuning", "full", "--prompt-length", "5"], "prompt_length"),
                          (["--tuning", "ivt", "--prompt-length", "5"], "prompt_length"),
                          (["--tuning", "ivt", "--ir-embed"], "ir_embed applies to tuning"),
                          (["--backbone", "swin_nano", "--layers", "30"], "blocks 0..7")]:
        with pytest.raises(SystemExit) as e:
            summary.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err, argv
