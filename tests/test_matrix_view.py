"""MatrixView: the one notion of a parameter's matrix, against hand-written layouts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_optlab.optim.matrix import MatrixView, default_view


def test_layouts_against_the_layers_own_math():
    torch.manual_seed(0)
    x = torch.randn(5, 6)
    linear = nn.Linear(6, 4, bias=False)
    torch.testing.assert_close(MatrixView("out_in").to_matrix(linear.weight) @ x.T, linear(x).T)
    from_in_out = torch.randn(6, 4)  # HF Conv1D: y = x @ W
    torch.testing.assert_close(MatrixView("in_out").to_matrix(from_in_out) @ x.T, (x @ from_in_out).T)
    conv = nn.Conv2d(3, 8, 3, bias=False)
    patch = torch.randn(1, 3, 3, 3)
    torch.testing.assert_close(MatrixView("out_in").to_matrix(conv.weight) @ patch.reshape(-1), conv(patch).reshape(-1))
    # ConvTranspose2d stores (in, out, kh, kw); its matrix maps an input pixel's channels to out * k
    deconv = nn.ConvTranspose2d(3, 5, 2, bias=False)
    pixel = torch.randn(1, 3, 1, 1)
    m = MatrixView("in_out").to_matrix(deconv.weight)
    assert m.shape == (5, 3 * 4)
    expected = deconv(pixel)[0]  # (5, 2, 2): out channel o, offset (i, j) = sum_c w[c, o, i, j] x_c
    got = torch.einsum("ock,c->ok", m.reshape(5, 3, 4), pixel.reshape(3)).reshape(5, 2, 2)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("view,shape", [
    (MatrixView("out_in"), (8, 3, 2, 2)), (MatrixView("in_out"), (6, 12)), (MatrixView("in_out"), (3, 5, 2, 2)),
    (MatrixView("out_in", 3), (12, 4)), (MatrixView("in_out", 3), (4, 12)), (MatrixView("table"), (1, 7, 4)),
])
def test_to_and_from_matrix_round_trip(view, shape):
    t = torch.randn(shape)
    m = view.to_matrix(t)
    rows, cols = view.shape(shape)
    assert m.shape == ((view.blocks, rows, cols) if view.blocks > 1 else (rows, cols))
    torch.testing.assert_close(view.from_matrix(m, shape), t)
    assert MatrixView.parse(view.code) == view


def test_blocks_are_the_row_blocks_of_the_fan_out():
    t = torch.arange(24.0).reshape(4, 6)  # HF Conv1D (in 4, out 6) of two packed 3 x 4 blocks
    blocks = MatrixView("in_out", 2).to_matrix(t)
    torch.testing.assert_close(blocks[1], t.T[3:])


def test_views_of_parameters_write_through():
    w = torch.zeros(4, 6)
    MatrixView("in_out").to_matrix(w).add_(1.0)  # a strided view: the stored tensor changes
    assert bool((w == 1).all())


def test_default_view_and_bad_codes():
    assert default_view(torch.zeros(16, 1, 1)) == MatrixView("vector")
    assert default_view(torch.zeros(1, 1, 8)) == MatrixView("vector")
    assert default_view(torch.zeros(3, 4)) == MatrixView("out_in")
    with pytest.raises(ValueError, match="layout must be one of"):
        MatrixView.parse("sideways")
    with pytest.raises(ValueError, match="not 3 equal blocks"):
        MatrixView("out_in", 3).shape((10, 4))
    with pytest.raises(ValueError, match="not a matrix"):
        MatrixView("vector").to_matrix(torch.zeros(3, 1))


CONFIG = Path(__file__).resolve().parents[1] / "configs" / "gpt" / "gradient_rank_stiefel.yaml"


def test_optlab_explain_prints_the_routing_of_a_config(capsys, monkeypatch):
    from lightning_optlab.cli import entry_point

    monkeypatch.setattr(sys, "argv", ["optlab", "explain", "--config", str(CONFIG),
                                      "--trainer.logger=false"])
    entry_point()
    out = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(out) if line.startswith("parameter "))
    rows = {line.split()[0]: line.split() for line in out[header + 1:] if line.strip()}
    assert rows["blocks.0.attn.qkv.weight"][-3:] == ["hidden", "muon", "stiefel"]
    assert rows["tok_emb.weight"][3] == "embedding"
    assert rows["lm_head.weight"][3] == "output"
    assert not any(n.startswith("optimizer") for n in rows)


def test_optlab_explain_without_a_config_says_how():
    from lightning_optlab.cli import explain_main

    with pytest.raises(SystemExit, match="usage: optlab explain --config FILE"):
        explain_main([])
