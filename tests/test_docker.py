"""docker/Dockerfile, linted the way hadolint would (there is no Docker engine here): a pinned base, no
`latest`, no secrets, a non-root user, the entrypoint module exists, port 30000, a /health check;
every COPY source exists and survives .dockerignore; the README's docker lines match the image."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKERFILE = os.path.join(REPO, "docker", "Dockerfile")
SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|PRIVATE_KEY)", re.IGNORECASE)
SECRET_VALUE = re.compile(r"(hf_[A-Za-z0-9]{30,}|sk-[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY)")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    with open(DOCKERFILE) as f:
        for raw in f:
            line = raw.strip()
            if not pending and (not line or line.startswith("#")):
                continue
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            line = pending + line
            pending = ""
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continuation line"
    return out


def of(keyword: str) -> list[str]:
    return [rest for kw, rest in instructions() if kw == keyword]


def test_base_image_is_pinned():
    bases = of("FROM")
    assert bases
    for base in bases:
        image = base.split()[0]
        name, _, tag = image.partition(":")
        assert "@sha256:" in image or re.fullmatch(r"\d+\.\d+\.\d+-[a-z0-9.-]+", tag), f"unpinned base {image}"
        assert "latest" not in image
        assert name.startswith("nvidia/cuda") and "runtime" in tag, "the base should be a CUDA runtime image"


def test_no_latest_and_no_secrets():
    text = open(DOCKERFILE).read()
    assert ":latest" not in text
    assert not SECRET_VALUE.search(text)
    for keyword in ("ENV", "ARG"):
        for rest in of(keyword):
            for assignment in shlex.split(rest):
                name = assignment.partition("=")[0]
                assert not SECRET_NAME.search(name), f"{keyword} {name}: secrets go in at run time, not in the image"


def test_pip_installs_are_pinned_where_it_matters_and_leave_no_cache():
    for run in of("RUN"):
        for command in run.split("&&"):
            if "pip install" in command:
                assert "--no-cache-dir" in command, command
    assert any('"torch==${TORCH_VERSION}"' in run for run in of("RUN"))
    assert [a for a in of("ARG") if re.fullmatch(r"TORCH_VERSION=\d+\.\d+\.\d+", a)]


def test_entrypoint_runs_our_module_as_a_non_root_user():
    entrypoint = json.loads(of("ENTRYPOINT")[-1])  # exec form: signals reach the launcher, no shell between
    assert entrypoint[:3] == ["python", "-m", "runtime"]
    module = entrypoint[2]
    assert os.path.isfile(os.path.join(REPO, module, "__main__.py"))
    assert "--host" in entrypoint and entrypoint[entrypoint.index("--host") + 1] == "0.0.0.0"
    users = of("USER")
    assert users and users[-1] not in ("root", "0")
    last_user = max(i for i, (kw, _) in enumerate(instructions()) if kw == "USER")
    assert last_user < max(i for i, (kw, _) in enumerate(instructions()) if kw == "ENTRYPOINT")


def test_port_and_healthcheck():
    assert "30000" in of("EXPOSE")[-1].split()
    entrypoint = json.loads(of("ENTRYPOINT")[-1])
    port = entrypoint[entrypoint.index("--port") + 1]
    health = of("HEALTHCHECK")[-1]
    assert f"127.0.0.1:{port}/health" in health and "CMD" in health
    assert "--start-period" in health  # a model load must not count as unhealthy


def dockerignore_patterns() -> list[str]:
    with open(os.path.join(REPO, ".dockerignore")) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p.removeprefix("**/")) for p in patterns)


def test_copy_sources_exist_and_are_not_ignored():
    patterns = dockerignore_patterns()
    assert {".git", "**/__pycache__", ".venv"} <= set(patterns)
    copies = of("COPY")
    assert copies
    for rest in copies:
        *sources, _destination = shlex.split(rest)
        for source in sources:
            assert os.path.exists(os.path.join(REPO, source)), f"COPY {source}: no such path in the repository"
            assert not ignored(source, patterns), f"COPY {source} is excluded by .dockerignore"
    copied = {source for rest in copies for source in shlex.split(rest)[:-1]}
    packages = {"runtime", "actors", "shm", "httpd", "kernels"}  # pyproject's [tool.setuptools.packages.find]
    assert packages | {"pyproject.toml", "README.md"} <= copied


def test_readme_and_docs_show_build_and_run():
    readme = open(os.path.join(REPO, "README.md")).read()
    build = re.search(r"docker build -f docker/Dockerfile -t (\S+) \.", readme)
    assert build, "the README shows the docker build command"
    tag = build.group(1)
    assert ":latest" not in tag and ":" in tag
    run = re.search(r"docker run [^`]*?" + re.escape(tag), readme, re.DOTALL)
    assert run, "the README's docker run line uses the image it builds"
    assert "--ipc=host" in run.group(0) or "--shm-size" in run.group(0)
    assert "-p 30000:30000" in run.group(0) and "--gpus all" in run.group(0)
