"""Readers for the deployment files, as the tools that run them read them: compose variable
interpolation, Dockerfile instructions by stage, and the nginx config templated for loopback.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
NGINX_CONF = DEPLOY / "nginx.conf"

SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "KEY")


# ---- YAML ------------------------------------------------------------------------------------

class _ComposeLoader(yaml.SafeLoader):
    """SafeLoader that also reads compose's ``!reset`` and ``!override`` tags."""


def _tagged(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.SequenceNode):
        return {"__tag__": node.tag, "value": loader.construct_sequence(node)}
    if isinstance(node, yaml.MappingNode):
        return {"__tag__": node.tag, "value": loader.construct_mapping(node)}
    return {"__tag__": node.tag, "value": loader.construct_scalar(node)}


_ComposeLoader.add_constructor("!reset", _tagged)
_ComposeLoader.add_constructor("!override", _tagged)


def load_yaml(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=_ComposeLoader)


def load_yaml_all(path: Path) -> list[Any]:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.load_all(f, Loader=_ComposeLoader) if d is not None]


# ---- compose interpolation (compose-spec "Interpolation") -------------------------------------

_VAR = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|-|:\?|\?|:\+|\+)"
                     r"(?P<arg>.*))?$", re.S)


class MissingVariable(Exception):
    """A ``${VAR:?message}`` whose variable is unset (compose refuses to start)."""


@dataclass(frozen=True)
class Reference:
    """One ``${...}`` in a compose file."""

    name: str
    op: str | None
    arg: str | None


def references(text: str) -> list[Reference]:
    out = []
    for m in _VAR.finditer(text):
        if m.group(0) == "$$":
            continue
        if m.group("bare"):
            out.append(Reference(m.group("bare"), None, None))
            continue
        b = _BRACED.match(m.group("braced"))
        if b is None:
            raise ValueError(f"malformed interpolation {m.group(0)!r}")
        out.append(Reference(b.group("name"), b.group("op"), b.group("arg")))
    return out


def interpolate(text: str, env: dict[str, str]) -> str:
    """Substitute like compose does; raises ``MissingVariable`` for an unset ``:?`` variable."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        if m.group("bare"):
            return env.get(m.group("bare"), "")
        b = _BRACED.match(m.group("braced"))
        if b is None:
            raise ValueError(f"malformed interpolation {m.group(0)!r}")
        name, op, arg = b.group("name", "op", "arg")
        value = env.get(name)
        if op == ":-":
            return value if value else arg
        if op == "-":
            return value if value is not None else arg
        if op in (":?", "?"):
            if value is None or (op == ":?" and value == ""):
                raise MissingVariable(f"{name}: {arg}")
            return value
        if op == ":+":
            return arg if value else ""
        if op == "+":
            return arg if value is not None else ""
        return value or ""

    return _VAR.sub(sub, text)


def interpolate_tree(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_tree(v, env) for v in node]
    if isinstance(node, dict):
        return {k: interpolate_tree(v, env) for k, v in node.items()}
    return node


def all_strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [s for v in node for s in all_strings(v)]
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in [str(k), *all_strings(v)]]
    return []


def defaulted_secrets(text: str) -> list[str]:
    """Interpolations of secret-looking variables that fall back to a value (``:-``, ``-``,
    ``:+``, ``+``) instead of failing when unset."""
    return [f"${{{r.name}{r.op}{r.arg}}}" for r in references(text)
            if any(w in r.name.upper() for w in SECRET_WORDS)
            and r.op in (":-", "-", ":+", "+")]


# ---- Dockerfile ------------------------------------------------------------------------------

@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [args for o, args in self.instructions if o == op]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if not line:
            continue
        op, _, args = line.partition(" ")
        out.append((op.upper(), args.strip()))
    return out


def dockerfile_stages(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the build stages in order."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for op, args in dockerfile_instructions(text):
        if op == "FROM":
            words = args.split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif not stages:
            if op == "ARG":
                k, _, v = args.partition("=")
                global_args[k] = v
        else:
            stages[-1].instructions.append((op, args))
    return global_args, stages


def env_pairs(args: str) -> dict[str, str]:
    """``ENV A=1 B=2`` (the key=value form) as a dict."""
    return dict(w.split("=", 1) for w in shlex.split(args))


# ---- nginx -----------------------------------------------------------------------------------

_UPSTREAM = re.compile(r"(upstream\s+aat\s*\{)(?P<body>.*?)(\n\s*\})", re.S)
_SERVER = re.compile(r"^(?P<indent>\s*)server\s+(?P<addr>\S+)(?P<params>[^;]*);", re.M)


def upstream_servers(conf: str) -> list[tuple[str, list[str]]]:
    """(address, parameters) of each ``server`` line of the ``aat`` upstream."""
    m = _UPSTREAM.search(conf)
    if m is None:
        raise ValueError("no `upstream aat { ... }` block")
    return [(s.group("addr"), s.group("params").split())
            for s in _SERVER.finditer(m.group("body"))]


def template_nginx(conf: str, upstream_ports: list[int], listen_port: int, workdir: Path) -> str:
    """The shipped config with only what differs on loopback changed.

    The replicas' ``server`` lines point at ``127.0.0.1:<port>`` (their other parameters kept;
    ``resolve`` dropped, there is no name to re-resolve), nginx listens on ``127.0.0.1``, and
    temporary files go under ``workdir`` (the packaged defaults are root-owned system paths).
    Raises if the config's shape changed so a substitution would silently not happen.
    """
    servers = upstream_servers(conf)
    if len(servers) != len(upstream_ports):
        raise ValueError(f"config has {len(servers)} replicas, test runs {len(upstream_ports)}")
    ports = iter(upstream_ports)

    def server(m: re.Match) -> str:
        params = [p for p in m.group("params").split() if p != "resolve"]
        return f"{m.group('indent')}server 127.0.0.1:{next(ports)} {' '.join(params)};"

    up = _UPSTREAM.search(conf)
    assert up is not None
    body = _SERVER.sub(server, up.group("body"))
    conf = conf[:up.start("body")] + body + conf[up.end("body"):]
    conf, n = re.subn(r"^(\s*)listen\s+\d+\s*;", rf"\1listen 127.0.0.1:{listen_port};", conf,
                      flags=re.M)
    if n != 1:
        raise ValueError(f"expected one `listen <port>;` line, found {n}")
    temp = "".join(f"    {d}_temp_path {workdir / d};\n"
                   for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf, n = re.subn(r"^http\s*\{\n", lambda m: m.group(0) + temp, conf, flags=re.M)
    if n != 1:
        raise ValueError("expected one `http {` block")
    return conf
