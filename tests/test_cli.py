"""The command line: every subcommand is registered and documents itself; bad input is one line."""

from __future__ import annotations

import pytest

from skipgpt.cli.main import COMMANDS, build_parser, main


def test_every_command_has_help(capsys):
    parser = build_parser()
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([name, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: skipgpt " + name)
        assert len(out.splitlines()) > 3


def test_bad_input_is_one_line_error(tmp_path, capsys):
    code = main(["info", "--model", str(tmp_path / "nowhere.gguf")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("skipgpt info: error:") and "does not exist" in err
    assert len(err.splitlines()) == 1


def test_info_names_the_routers_own_cost(tiny_dir, tmp_path, capsys):
    """MLP routers run on every token: info says how much of the decoder they are (hand count: hidden -> hidden/4
    -> 1 per module, the last layer's two rows folded into one at inference; two modules per layer)."""
    from skipgpt import RoutedModel, SkipConfig, load_model, save_routers

    model, _ = load_model(str(tiny_dir / "model"))
    save_routers(RoutedModel(model, SkipConfig(router="mlp")), tmp_path / "r")
    config = model.config
    h, layers = config.hidden_size, config.num_hidden_layers
    routers = 2 * layers * (h * (h // 4) + h // 4 + h // 4 + 1)
    decoder = sum(p.numel() for name, p in model.named_parameters() if ".layers." in name)
    assert main(["info", "--model", str(tiny_dir / "model"), "--routers", str(tmp_path / "r")]) == 0
    assert f"run on every token: {routers / decoder:.2%} of the decoder" in capsys.readouterr().out
    # MoD-D's routers score every token too (its decisions come from a saved policy): charged the same
    from skipgpt.baselines import mod_d

    save_routers(mod_d(load_model(str(tiny_dir / "model"))[0], 0.25, SkipConfig(router="mlp"),
                       thresholds=[[0.0, 0.0]] * layers), tmp_path / "m")
    assert main(["info", "--model", str(tiny_dir / "model"), "--routers", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "mod-d baseline" in out and f"run on every token: {routers / decoder:.2%} of the decoder" in out
