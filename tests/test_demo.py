"""The README's main command runs without the shared rMD17 data (self-made fallback data)."""
import torch

from mmea_kernels import demo


def test_demo_runs_on_self_made_data(monkeypatch, capsys):
    monkeypatch.setattr(demo, "find_rmd17", lambda path=None: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = demo.run(pretrain_steps=3, adapt_steps=3)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "self-made Morse-potential data" in out
    assert "identity at init: max |dE| = 0.00e+00 eV" in out
    assert set(rows) == {"pretrained, not adapted", "MMEA rank 16", "ELORA rank 16"}
    assert rows["MMEA rank 16"]["trainable"] == 6346
    assert all(r["forces_mae_meV_per_A"] > 0 for r in rows.values())
