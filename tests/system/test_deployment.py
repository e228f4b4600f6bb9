"""What can be checked of the Dockerfile without a Docker engine, and the README's commands."""

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
README = (ROOT / "README.md").read_text()


def _instructions(name: str) -> list[str]:
    text = DOCKERFILE.replace("\\\n", " ")
    return [line.split(None, 1)[1] for line in text.splitlines()
            if line.strip().upper().startswith(name + " ")]


def _readme_command(section: str) -> str:
    match = re.search(rf"## {section}\s+```bash\n(.+?)\n```", README, re.S)
    assert match, f"README has no '{section}' command"
    return match.group(1).strip()


def test_every_copied_path_exists():
    for arguments in _instructions("COPY"):
        sources = shlex.split(arguments)[:-1]
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which is missing"


def test_container_starts_what_the_readme_starts():
    start = _readme_command("Start")
    assert start.startswith("pip install -r requirements.txt && ")
    readme_run = shlex.split(start.split("&&", 1)[1])
    (command,) = _instructions("CMD")
    docker_run = [part for part in eval(command) if not part.startswith("--server.")]
    assert docker_run == readme_run


def test_health_check_user_and_port():
    (health,) = _instructions("HEALTHCHECK")
    assert "/_stcore/health" in health
    users = _instructions("USER")
    assert users and users[-1].strip() not in ("root", "0")
    assert _instructions("EXPOSE") == ["8501"]
    assert any("requirements.txt" in run for run in _instructions("RUN"))


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    blocks = re.findall(r"## (Start|Test)\s+```bash\n(.+?)\n```", README, re.S)
    assert [name for name, _ in blocks] == ["Start", "Test"]
    test_command = _readme_command("Test").split("&&")[-1].strip()
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_the_app_listens_on_localhost_only_unless_asked():
    import tomllib

    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["address"] == "localhost"  # as the README promises
    assert "localhost" in README
