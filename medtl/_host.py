"""The plugin host: loads builtin and third-party plugins and builds components."""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import logging
import os
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Iterable

import pluggy

from medtl import hookspecs
from medtl.errors import PluginError, UnknownComponentError

__all__ = [
    "ENTRY_POINT_GROUP",
    "BUILTIN_PLUGINS",
    "KINDS",
    "PluginHost",
    "PluginFailure",
    "get_host",
    "set_host",
]

logger = logging.getLogger(__name__)

#: Third-party plugins declare an entry point in this group, for example in setup.cfg:
#: ``[options.entry_points] medtl = mything = mything.plugin``.
ENTRY_POINT_GROUP = "medtl"

#: Builtin plugin modules. They go through the same ``register()`` as outside plugins.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "medtl_plugins.sources",
    "medtl_plugins.transforms",
    "medtl_plugins.backbones",
    "medtl_plugins.poolings",
    "medtl_plugins.finetune",
    "medtl_plugins.dann",
    "medtl_plugins.alignment",
    "medtl_plugins.contrastive",
    "medtl_plugins.validators",
    "medtl_plugins.metrics",
)

#: Component kind -> the hook that registers it.
KINDS: dict[str, str] = {
    "source": "medtl_register_sources",
    "transform": "medtl_register_transforms",
    "backbone": "medtl_register_backbones",
    "pooling": "medtl_register_poolings",
    "strategy": "medtl_register_strategies",
    "metric": "medtl_register_metrics",
    "validator": "medtl_register_validators",
}


@dataclass
class PluginFailure:
    """A plugin that could not be loaded, with the reason."""

    name: str
    origin: str
    error: str


@dataclass
class _Component:
    factory: Callable[..., Any]
    plugin: str


@dataclass
class PluginHost:
    """A pluggy plugin manager plus the component registry built from its hooks.

    Args:
        block: plugin names that are not registered. Builtins can be blocked too.
        allow: when set, only these plugin names are registered (an allow-list for
            vetted deployments); builtins must be listed as well.
        modules: extra plugin modules to import by dotted name, for one-off local plugins.
        entry_points: whether to load third-party plugins from the entry-point group.
        strict: raise :class:`PluginError` when any plugin fails to load, instead of
            recording the failure and going on with the others.
        trace: log every hook call with its plugin and duration (also set by
            ``MEDTL_TRACE_HOOKS=1``).
    """

    block: Iterable[str] = ()
    allow: Iterable[str] | None = None
    modules: Iterable[str] = ()
    entry_points: bool = True
    strict: bool = False
    trace: bool | None = None
    pm: pluggy.PluginManager = field(init=False)
    failures: list[PluginFailure] = field(init=False, default_factory=list)
    origins: dict[str, str] = field(init=False, default_factory=dict)
    _registry: dict[str, dict[str, _Component]] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        env_block = [n.strip() for n in os.environ.get("MEDTL_BLOCK_PLUGINS", "").split(",") if n.strip()]
        self.block = set(self.block) | set(env_block)
        self.allow = set(self.allow) if self.allow is not None else None
        self.pm = pluggy.PluginManager("medtl")
        self.pm.add_hookspecs(hookspecs)
        if self.trace is None:
            self.trace = os.environ.get("MEDTL_TRACE_HOOKS", "") not in ("", "0")
        if self.trace:
            self._install_tracing()
        self._load()

    # -- loading --------------------------------------------------------------

    def _load(self) -> None:
        for module_name in BUILTIN_PLUGINS:
            self._import_and_register(module_name, module_name, origin="builtin")
        if self.entry_points:
            self._load_entry_points()
        for module_name in self.modules:
            self._import_and_register(module_name, module_name, origin="module")
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(
                f"plugin {exc.plugin!r} implements a hook that medtl does not define: {exc}. "
                "Check the hook name against docs/plugins.md."
            ) from exc

    def _is_wanted(self, name: str) -> bool:
        if name in self.block:
            logger.info("plugin %s is blocked and was not loaded", name)
            return False
        if self.allow is not None and name not in self.allow:
            logger.info("plugin %s is not in plugins.allow and was not loaded", name)
            return False
        return True

    def _load_entry_points(self) -> None:
        # pluggy's load_setuptools_entrypoints stops at the first failing plugin, so
        # each entry point is loaded on its own and a failure is recorded by name.
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if not self._is_wanted(ep.name) or self.pm.has_plugin(ep.name):
                continue
            dist = getattr(ep, "dist", None)
            origin = f"{dist.name} {dist.version}" if dist is not None else "entry point"
            try:
                plugin = ep.load()
            except Exception as exc:  # noqa: BLE001 - any import-time error of a plugin is reported
                self._record_failure(ep.name, origin, exc)
                continue
            self._register(plugin, ep.name, origin)

    def _import_and_register(self, module_name: str, name: str, origin: str) -> None:
        if not self._is_wanted(name):
            return
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # noqa: BLE001 - reported with the plugin's name
            self._record_failure(name, origin, exc)
            return
        self._register(module, name, origin)

    def _record_failure(self, name: str, origin: str, exc: BaseException) -> None:
        failure = PluginFailure(name=name, origin=origin, error=f"{type(exc).__name__}: {exc}")
        self.failures.append(failure)
        if self.strict:
            raise PluginError(f"plugin {name!r} ({origin}) failed to load: {failure.error}") from exc
        logger.error("plugin %s (%s) failed to load and is skipped: %s", name, origin, failure.error)

    def _register(self, plugin: Any, name: str, origin: str) -> None:
        try:
            self.pm.register(plugin, name=name)
        except (ValueError, pluggy.PluginValidationError) as exc:
            self._record_failure(name, origin, exc)
            return
        self.origins[name] = origin
        self._registry = None

    def register(self, plugin: Any, name: str | None = None) -> None:
        """Register a plugin object (a module or an instance with hook implementations)."""
        name = name or getattr(plugin, "__name__", None) or repr(plugin)
        if not self._is_wanted(name):
            return
        self._register(plugin, name, origin="registered")
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(name=name)
            raise PluginError(f"plugin {name!r} implements an unknown hook: {exc}") from exc

    def unregister(self, name: str) -> None:
        """Remove a plugin by name."""
        self.pm.unregister(name=name)
        self.origins.pop(name, None)
        self._registry = None

    def _install_tracing(self) -> None:
        trace_logger = logging.getLogger("medtl.hooks")
        starts: list[float] = []

        def before(hook_name: str, hook_impls: list, kwargs: dict) -> None:
            starts.append(time.perf_counter())

        def after(outcome: Any, hook_name: str, hook_impls: list, kwargs: dict) -> None:
            elapsed = time.perf_counter() - starts.pop()
            plugins = ", ".join(self.pm.get_name(impl.plugin) or "?" for impl in hook_impls)
            trace_logger.info("hook %s called on [%s] in %.2f ms", hook_name, plugins, elapsed * 1000)

        self.pm.add_hookcall_monitoring(before, after)

    # -- components -----------------------------------------------------------

    def _build_registry(self) -> dict[str, dict[str, _Component]]:
        registry: dict[str, dict[str, _Component]] = {}
        for kind, hook_name in KINDS.items():
            table: dict[str, _Component] = {}
            hook = getattr(self.pm.hook, hook_name)
            # Each implementation is called on its own, so a duplicate name can be
            # attributed to both plugins that claim it.
            for impl in reversed(hook.get_hookimpls()):
                plugin_name = self.pm.get_name(impl.plugin) or repr(impl.plugin)
                result = impl.function()
                if not result:
                    continue
                if not isinstance(result, dict):
                    raise PluginError(
                        f"plugin {plugin_name!r}: hook {hook_name} returned {type(result).__name__}, "
                        "expected a dict from component name to factory"
                    )
                for comp_name, factory in result.items():
                    if comp_name in table:
                        raise PluginError(
                            f"{kind} {comp_name!r} is registered by two plugins: "
                            f"{table[comp_name].plugin!r} and {plugin_name!r}. "
                            "Block one of them (MEDTL_BLOCK_PLUGINS or plugins.block in the study file)."
                        )
                    table[comp_name] = _Component(factory, plugin_name)
            registry[kind] = table
        return registry

    @property
    def registry(self) -> dict[str, dict[str, _Component]]:
        if self._registry is None:
            self._registry = self._build_registry()
        return self._registry

    def components(self, kind: str) -> list[str]:
        """List the registered component names of one kind, sorted."""
        _check_kind(kind)
        return sorted(self.registry[kind])

    def component_plugin(self, kind: str, name: str) -> str:
        """Return the name of the plugin that registers a component."""
        return self._lookup(kind, name).plugin

    def factory(self, kind: str, name: str) -> Callable[..., Any]:
        """Return the factory registered for a component."""
        return self._lookup(kind, name).factory

    def create(self, kind: str, name: str, **options: Any) -> Any:
        """Build a component by kind and name."""
        factory = self.factory(kind, name)
        try:
            return factory(**options)
        except TypeError as exc:
            raise UnknownComponentError(f"invalid options for {kind} {name!r}: {exc}") from exc

    def _lookup(self, kind: str, name: str) -> _Component:
        _check_kind(kind)
        table = self.registry[kind]
        if name in table:
            return table[name]
        valid = sorted(table)
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownComponentError(
            f"unknown {kind} {name!r}.{hint} Valid names: {', '.join(valid) or '(none registered)'}."
        )

    def plugin_infos(self) -> list[dict[str, Any]]:
        """Describe every registered plugin and every load failure."""
        infos = []
        for name, plugin in self.pm.list_name_plugin():
            contributes: dict[str, list[str]] = {}
            for kind, table in self.registry.items():
                names = sorted(n for n, c in table.items() if c.plugin == name)
                if names:
                    contributes[kind] = names
            hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
            infos.append(
                {
                    "name": name,
                    "origin": self.origins.get(name, ""),
                    "module": getattr(plugin, "__name__", type(plugin).__name__),
                    "components": contributes,
                    "hooks": hooks,
                    "status": "loaded",
                }
            )
        for failure in self.failures:
            infos.append(
                {
                    "name": failure.name,
                    "origin": failure.origin,
                    "module": "",
                    "components": {},
                    "hooks": [],
                    "status": "failed",
                    "error": failure.error,
                }
            )
        return infos

    def plugin_versions(self) -> dict[str, str]:
        """Return each loaded plugin's origin (distribution and version, or "builtin")."""
        return {name: self.origins.get(name, "") for name, _ in self.pm.list_name_plugin()}


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise UnknownComponentError(f"unknown component kind {kind!r}. Valid kinds: {', '.join(KINDS)}.")


_current: PluginHost | None = None


def get_host() -> PluginHost:
    """Return the process-wide host, creating it on first use."""
    global _current
    if _current is None:
        _current = PluginHost()
    return _current


def set_host(host: PluginHost | None) -> PluginHost | None:
    """Replace the process-wide host and return the previous one."""
    global _current
    previous, _current = _current, host
    return previous


def import_plugin_module(path: str) -> ModuleType:
    """Import a plugin module by dotted name."""
    return importlib.import_module(path)
