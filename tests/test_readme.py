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
