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
