"""`python -m ivt.summary`: the table and the paper's rows beside ours."""
import subprocess
import sys

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
