"""``medtl plugins``: list loaded plugins, their components and load failures."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("plugins", help="list plugins, their components and load failures")
    parser.add_argument("--all", action="store_true", help="include builtin plugins")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
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
        print("no third-party plugins loaded; use --all to list the builtin ones")
    for info in infos:
        status = "" if info["status"] == "loaded" else f"  FAILED: {info['error']}"
        print(f"{info['name']}  ({info['origin'] or 'registered'}){status}")
        for kind, names in info["components"].items():
            print(f"    {kind}: {', '.join(names)}")
        if info["hooks"]:
            print(f"    hooks: {', '.join(info['hooks'])}")
    return 0
