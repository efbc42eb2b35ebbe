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


def printed_rows(capsys, argv):
    """{first words: last field} of the lines `python -m ivt.summary argv` prints."""
    summary.main(argv)
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        head, _, last = line.rpartition(" ")
        rows[head.strip()] = last
    return rows


def test_component_breakdown_from_the_architecture(capsys):
    """Swin-L's per-component counts against hand counts from its widths (C = 192, 384, 768,
    1536 in 2, 2, 18, 2 blocks: sum of C over blocks 18,048) and IV-tuning's defaults (d2 = 64,
    d3 = 8; two HAs and two IPAs per block): HA linears 2 (C d2 + d2 + d2 C + C), IPA linears
    2 (C d3 + d3 + d3 C + C), LayerNorm affines and SFT gamma/beta 2 x 2C each; the IR patch
    embedding a 4x4 conv 3 -> 192 with bias and a LayerNorm; VPT 10 prompts per block. The
    percentage is #TP over the visible model's 195,195,444 (summary's notes)."""
    sum_c, blocks = 2 * 192 + 2 * 384 + 18 * 768 + 2 * 1536, 24
    rows = printed_rows(capsys, ["--backbone", "swin_l"])
    want = {"IR patch embedding conv": 3 * 4 * 4 * 192 + 192, "IR patch embedding LayerNorm": 384,
            "EMPG shared LayerNorm": 384,
            "HA LayerNorm affine": 4 * sum_c, "HA SFT gamma/beta": 4 * sum_c,
            "HA linears (down, up)": 2 * (129 * sum_c + 64 * blocks),
            "IPA LayerNorm affine": 4 * sum_c, "IPA SFT1 gamma/beta": 4 * sum_c,
            "IPA SFT2 gamma/beta": 4 * sum_c,
            "IPA linears (down, up)": 2 * (17 * sum_c + 8 * blocks)}
    assert {k: int(rows[k].replace(",", "")) for k in want} == want
    tp = int(rows["trainable (#TP)"].replace(",", ""))
    c = summary.count("swin_nano", tuning="ivt")            # the components split #TP
    assert sum(c["components"].values()) == c["trainable"]
    assert rows["#TP / visible model:"] == f"{100 * tp / 195_195_444:.2f}%"
    rows = printed_rows(capsys, ["--backbone", "swin_l", "--tuning", "vpt"])
    assert rows["VPT prompts"] == f"{10 * sum_c:,}" and rows["IR patch embedding conv"] == "9,408"


def test_methods_table_ir_share_and_ratio(capsys):
    """Table 4's rows: the IR patch embedding (9,792 parameters, METHOD_NOTES) in every PETL
    method's count and in neither full nor freeze; ours/paper as the notes give it for VPT
    (190,272 against 0.20M: -4.9%); no paper value beside another backbone's counts."""
    rows = summary.methods_table()
    assert {r["tuning"]: r["ir_embed"] for r in rows} == {
        "full": 0, "freeze": 0, "vpt": 9792, "adaptformer": 9792, "bi_adaptformer": 9792,
        "rein": 9792, "ivt": 9792}
    summary.print_methods()
    vpt = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("VPT"))
    assert vpt.split()[-2:] == ["0.20M", "-4.9%"]
    assert all(r["paper_M"] is None and r["ratio"] is None
               for r in summary.methods_table("swin_nano"))
