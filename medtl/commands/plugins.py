"""``medtl plugins``: list loaded plugins, their components and hooks, and load failures."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plugins", help="list plugins, their components and load failures",
        description="List each loaded plugin with its distribution and version, the components it adds "
                    "by kind, and the hooks it implements. Plugins that failed to load are listed with "
                    "the error. MEDTL_BLOCK_PLUGINS and MEDTL_TRACE_HOOKS apply here as in a run.",
    )
    parser.add_argument("--all", action="store_true", help="include the builtin plugins")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of text")
    parser.set_defaults(func=plugins_command)


def plugins_command(args: argparse.Namespace) -> int:
    from medtl._host import get_host

    infos = get_host().plugin_infos()
    if not args.all:
        infos = [i for i in infos if i["origin"] != "builtin"]
    if args.json:
        print(json.dumps(infos, indent=2))
        return 0
    if not infos:
        print("no third-party plugins loaded; use --all to list the builtin ones too")
    for info in infos:
        print(format_plugin(info))
    return 0


def format_plugin(info: dict[str, Any]) -> str:
    """Format one entry of :meth:`PluginHost.plugin_infos` as indented text."""
    if info["distribution"]:
        where = f"{info['distribution']} {info['version'] or '(unknown version)'}"
        if info["origin"] == "builtin":
            where += ", builtin"
    else:
        where = info["origin"]
    lines = [f"{info['name']}  ({where})"]
    if info["status"] != "loaded":
        lines.append(f"    FAILED: {info['error']}")
    for kind, names in info["components"].items():
        lines.append(f"    {kind}: {', '.join(names)}")
    if info["hooks"]:
        lines.append(f"    hooks: {', '.join(info['hooks'])}")
    return "\n".join(lines)
