"""The plugin host: loads builtin and third-party plugins and builds components."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable, Mapping, Sequence

import pluggy

from medtl import hookspecs
from medtl.errors import ConfigError, PluginError, UnknownComponentError, did_you_mean

__all__ = [
    "ENTRY_POINT_GROUP",
    "BUILTIN_PLUGINS",
    "KINDS",
    "PluginHost",
    "PluginFailure",
    "PluginOrigin",
    "get_host",
    "set_host",
    "unknown_component_message",
]

logger = logging.getLogger(__name__)
#: Receives one INFO record per hook call when tracing is on.
trace_logger = logging.getLogger("medtl.hooks")

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
    "medtl_plugins.tensorboard_tracker",
    "medtl_plugins.mlflow_tracker",
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

#: Component kind -> the study key under which its options are set, for error messages.
_OPTIONS_KEYS: dict[str, str] = {
    "source": "data.sources.{name}",
    "transform": "transforms.options",
    "backbone": "model.backbone.options",
    "pooling": "model.pooling.options",
    "strategy": "strategy.options",
    "validator": "train.select_options",
}


@dataclass(frozen=True)
class PluginOrigin:
    """Where a plugin came from.

    ``kind`` is ``"builtin"``, ``"entry point"`` (an installed distribution),
    ``"module"`` (a local module named in ``plugins.modules``) or ``"registered"``
    (passed to :meth:`PluginHost.register` by code). ``distribution`` and ``version``
    name the installed distribution that ships the plugin, when there is one.
    """

    kind: str
    distribution: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        if self.distribution:
            return f"{self.distribution} {self.version or '(unknown version)'}"
        return self.kind


@dataclass
class PluginFailure:
    """A plugin that could not be loaded, with the reason.

    ``origin`` is the readable form of where it came from; ``kind``,
    ``distribution`` and ``version`` are the parts of its :class:`PluginOrigin`.
    """

    name: str
    origin: str
    error: str
    kind: str = ""
    distribution: str | None = None
    version: str | None = None


@dataclass
class _Component:
    factory: Callable[..., Any]
    plugin: str


def _medtl_origin() -> PluginOrigin:
    import medtl

    return PluginOrigin("builtin", "medtl", medtl.__version__)


@dataclass
class PluginHost:
    """A pluggy plugin manager plus the component registry built from its hooks.

    Plugins load in this order: the builtin modules of :data:`BUILTIN_PLUGINS`,
    third-party plugins of the ``medtl`` entry-point group, then the local modules of
    ``modules``. A plugin that fails to import is recorded in :attr:`failures` and
    logged with its name and cause, and the others still load; with ``strict`` the
    first failure raises :class:`PluginError` instead.

    Args:
        block: plugin names that are not registered. Builtins can be blocked too.
            ``MEDTL_BLOCK_PLUGINS`` (comma-separated names) adds to this list. A
            name that matches no known plugin logs a warning (see :meth:`known_plugin_names`).
        allow: when set, only these plugin names are registered (an allow-list for
            vetted deployments); builtins must be listed as well.
        modules: local plugin modules, for one-off work without packaging: dotted
            module names, or paths of ``.py`` files.
        search_path: folders searched first for ``modules`` and against which
            relative ``.py`` paths resolve; the engine passes the study file's folder.
            They are on ``sys.path`` only while those modules are imported.
        entry_points: whether to load third-party plugins from the entry-point group.
        strict: raise :class:`PluginError` when any plugin fails to load, instead of
            recording the failure and going on with the others.
        trace: log every hook call with its plugins and duration to the logger
            ``medtl.hooks`` (default: on when ``MEDTL_TRACE_HOOKS`` is set to
            anything other than ``0``).
    """

    block: Iterable[str] = ()
    allow: Iterable[str] | None = None
    modules: Iterable[str] = ()
    search_path: Iterable[str | os.PathLike[str]] = ()
    entry_points: bool = True
    strict: bool = False
    trace: bool | None = None
    pm: pluggy.PluginManager = field(init=False)
    failures: list[PluginFailure] = field(init=False, default_factory=list)
    origins: dict[str, PluginOrigin] = field(init=False, default_factory=dict)
    _registry: dict[str, dict[str, _Component]] | None = field(init=False, default=None)
    _block_sources: dict[str, str] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        env_block = [n.strip() for n in os.environ.get("MEDTL_BLOCK_PLUGINS", "").split(",") if n.strip()]
        self._block_sources = {name: "plugins.block" for name in self.block}
        self._block_sources.update({name: "MEDTL_BLOCK_PLUGINS" for name in env_block})
        self.block = set(self.block) | set(env_block)
        self.allow = set(self.allow) if self.allow is not None else None
        self.modules = list(self.modules)
        self.search_path = [Path(p) for p in self.search_path]
        self.pm = pluggy.PluginManager("medtl")
        self.pm.add_hookspecs(hookspecs)
        if self.trace is None:
            self.trace = os.environ.get("MEDTL_TRACE_HOOKS", "") not in ("", "0")
        if self.trace:
            self._install_tracing()
        self._load()

    # -- loading --------------------------------------------------------------

    def _load(self) -> None:
        self._warn_unknown_blocked()
        for module_name in BUILTIN_PLUGINS:
            self._import_and_register(module_name, module_name, _medtl_origin())
        if self.entry_points:
            self._load_entry_points()
        for spec in self.modules:
            self._load_local_module(spec)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(
                f"plugin {self._plugin_name(exc.plugin)!r} implements a hook that medtl does not define: "
                f"{exc}. Check the hook name against docs/plugins.md."
            ) from exc
        # Collect the components now, so that a plugin whose registration hook fails
        # is reported at start-up, like one that fails to import.
        try:
            self._registry = self._build_registry()
        except PluginError:
            if self.strict:
                raise
            # A duplicate component name: the error is raised again when a component
            # is requested, and `medtl plugins` reports it the same way.

    def known_plugin_names(self) -> list[str]:
        """List the plugin names that a block list can match, whether or not they are loaded.

        These are the builtin modules, every entry point of the ``medtl`` group (loaded,
        blocked or failed) and the local modules of ``modules``.
        """
        names = set(BUILTIN_PLUGINS)
        names.update(ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
        names.update(Path(spec).stem if spec.endswith(".py") else spec for spec in self.modules)
        names.update(self.origins)
        return sorted(names)

    def _warn_unknown_blocked(self) -> None:
        """Warn once per process about each blocked name that matches no known plugin.

        It is a warning, not an error, because blocking a third-party plugin that is
        not installed is harmless, but a misspelt name blocks nothing.
        """
        known = self.known_plugin_names()
        for name in sorted(set(self.block) - set(known)):
            if name in _warned_block_names:
                continue
            _warned_block_names.add(name)
            # A builtin's short name ("dann") does not block it, so the hint names the module.
            hint = did_you_mean(name, known)
            logger.warning(
                "%s names %r, which matches no known plugin, so it blocks nothing.%s Known plugins: %s. "
                "If it is a third-party plugin that is not installed, nothing needs blocking and this "
                "warning can be ignored.", self._block_sources.get(name, "the block list"), name, hint,
                ", ".join(known))

    def _plugin_name(self, plugin: object) -> str:
        return self.pm.get_name(plugin) or repr(plugin)

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
            if not self._is_wanted(ep.name):
                continue
            dist = getattr(ep, "dist", None)
            origin = PluginOrigin("entry point", dist.name if dist else None, dist.version if dist else None)
            if self.pm.has_plugin(ep.name):
                # Two distributions that declare the same entry-point name, or one
                # distribution found twice on sys.path: keep the first one.
                if str(origin) != str(self.origins.get(ep.name)):
                    logger.warning("plugin name %s (%s) is already taken by %s; the second one is not loaded",
                                   ep.name, origin, self.origins.get(ep.name))
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # noqa: BLE001 - any import-time error of a plugin is reported
                self._record_failure(ep.name, origin, exc)
                continue
            self._register(plugin, ep.name, origin)

    def _import_and_register(self, module_name: str, name: str, origin: PluginOrigin) -> None:
        if not self._is_wanted(name):
            return
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # noqa: BLE001 - reported with the plugin's name
            self._record_failure(name, origin, exc)
            return
        self._register(module, name, origin)

    def _load_local_module(self, spec: str) -> None:
        """Import a module named in ``modules`` and register it under that name."""
        origin = PluginOrigin("module")
        if spec.endswith(".py"):
            name = Path(spec).stem
            if not self._is_wanted(name):
                return
            try:
                module = self._import_file(spec)
            except Exception as exc:  # noqa: BLE001 - reported with the plugin's name
                self._record_failure(name, origin, exc)
                return
            self._register(module, name, origin)
            return
        if not self._is_wanted(spec):
            return
        added = [str(p) for p in self.search_path if str(p) not in sys.path]
        sys.path[:0] = added
        importlib.invalidate_caches()
        try:
            module = importlib.import_module(spec)
        except ModuleNotFoundError as exc:
            if exc.name != spec.split(".")[0]:
                self._record_failure(spec, origin, exc)
            else:
                where = ", ".join(added) or "no study folder"
                self._record_failure(spec, origin, ModuleNotFoundError(
                    f"no module named {spec!r} in the study file's folder ({where}) or on sys.path"))
            return
        except Exception as exc:  # noqa: BLE001 - reported with the plugin's name
            self._record_failure(spec, origin, exc)
            return
        finally:
            for path in added:
                sys.path.remove(path)
        self._register(module, spec, origin)

    def _import_file(self, spec: str) -> ModuleType:
        path = Path(spec).expanduser()
        if not path.is_absolute():
            bases = list(self.search_path) or [Path.cwd()]
            path = next((b / path for b in bases if (b / path).is_file()), bases[0] / path)
        if not path.is_file():
            raise FileNotFoundError(f"plugin file {path} not found (plugins.modules resolves relative "
                                    "paths against the study file's folder)")
        module_name = f"medtl_local_{path.stem}"
        file_spec = importlib.util.spec_from_file_location(module_name, path)
        if file_spec is None or file_spec.loader is None:
            raise ImportError(f"cannot import {path} as a Python module")
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[module_name] = module
        try:
            file_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
        return module

    def _record_failure(self, name: str, origin: PluginOrigin, exc: BaseException) -> None:
        failure = PluginFailure(name=name, origin=str(origin), error=f"{type(exc).__name__}: {exc}",
                                kind=origin.kind, distribution=origin.distribution, version=origin.version)
        self.failures.append(failure)
        if self.strict:
            raise PluginError(f"plugin {name!r} ({origin}) failed to load: {failure.error}. "
                              "Fix or block it (MEDTL_BLOCK_PLUGINS, or plugins.block in the study file), "
                              "or turn off plugins.strict to go on without it.") from exc
        logger.error("plugin %s (%s) failed to load and is skipped: %s", name, origin, failure.error)

    def _register(self, plugin: Any, name: str, origin: PluginOrigin) -> None:
        try:
            self.pm.register(plugin, name=name)
        except (ValueError, pluggy.PluginValidationError) as exc:
            self._record_failure(name, origin, exc)
            return
        unknown = self._unknown_hooks(plugin)
        if unknown:
            # The per-plugin form of pluggy's check_pending(), so that one plugin with
            # a misspelt hook is left out instead of stopping every other plugin.
            self.pm.unregister(name=name)
            self._record_failure(name, origin, PluginError(
                f"it implements {', '.join(unknown)}, which medtl does not define; "
                "check the hook names against docs/plugins.md"))
            return
        self.origins[name] = origin
        self._registry = None

    def _unknown_hooks(self, plugin: Any) -> list[str]:
        unknown = []
        for caller in self.pm.get_hookcallers(plugin) or []:
            if caller.has_spec():
                continue
            if any(impl.plugin is plugin and not impl.optionalhook for impl in caller.get_hookimpls()):
                unknown.append(caller.name)
        return sorted(unknown)

    def register(self, plugin: Any, name: str | None = None) -> None:
        """Register a plugin object (a module or an instance with hook implementations).

        Raises:
            PluginError: the plugin implements a hook that medtl does not define, or
                its name is already taken.
        """
        name = name or getattr(plugin, "__name__", None) or repr(plugin)
        if not self._is_wanted(name):
            return
        try:
            self.pm.register(plugin, name=name)
        except (ValueError, pluggy.PluginValidationError) as exc:
            raise PluginError(f"plugin {name!r} could not be registered: {exc}") from exc
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(name=name)
            raise PluginError(f"plugin {name!r} implements a hook that medtl does not define: {exc}. "
                              "Check the hook name against docs/plugins.md.") from exc
        self.origins[name] = PluginOrigin("registered")
        self._registry = None

    def unregister(self, name: str) -> None:
        """Remove a plugin by name."""
        self.pm.unregister(name=name)
        self.origins.pop(name, None)
        self._registry = None

    # -- tracing ----------------------------------------------------------------

    def _install_tracing(self) -> None:
        starts: list[float] = []

        def before(hook_name: str, hook_impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, Any]) -> None:
            starts.append(time.perf_counter())

        def after(outcome: pluggy.Result[Any], hook_name: str, hook_impls: Sequence[pluggy.HookImpl],
                  kwargs: Mapping[str, Any]) -> None:
            elapsed = time.perf_counter() - starts.pop()
            plugins = ", ".join(impl.plugin_name for impl in reversed(hook_impls))
            failed = " (raised)" if outcome.exception is not None else ""
            trace_logger.info("hook %s on [%s]: %.2f ms%s", hook_name, plugins, elapsed * 1000, failed)

        self.pm.add_hookcall_monitoring(before, after)

    # -- components -----------------------------------------------------------

    def _build_registry(self) -> dict[str, dict[str, _Component]]:
        while True:
            try:
                return self._collect_components()
            except _BrokenHook as broken:
                # The plugin is already registered, so drop it and collect again,
                # leaving the other plugins' components in place.
                self._record_failure(broken.plugin, self.origins.get(broken.plugin, PluginOrigin("registered")),
                                     broken.error)
                self.unregister(broken.plugin)

    def _collect_components(self) -> dict[str, dict[str, _Component]]:
        registry: dict[str, dict[str, _Component]] = {}
        for kind, hook_name in KINDS.items():
            table: dict[str, _Component] = {}
            hook = getattr(self.pm.hook, hook_name)
            # Each implementation is called on its own, so that a duplicate name can be
            # attributed to both plugins that claim it. get_hookimpls() lists them in
            # reverse call order; reversing it gives pluggy's call order.
            for impl in reversed(hook.get_hookimpls()):
                plugin_name = impl.plugin_name
                start = time.perf_counter()
                try:
                    result = impl.function()
                except Exception as exc:  # noqa: BLE001 - a plugin's bug, reported with its name
                    raise _BrokenHook(plugin_name, RuntimeError(
                        f"hook {hook_name} raised {type(exc).__name__}: {exc}")) from exc
                if self.trace:
                    trace_logger.info("hook %s on [%s]: %.2f ms", hook_name, plugin_name,
                                      (time.perf_counter() - start) * 1000)
                if not result:
                    continue
                if not isinstance(result, dict):
                    raise _BrokenHook(plugin_name, TypeError(
                        f"hook {hook_name} returned {type(result).__name__}, "
                        "expected a dict from component name to factory"))
                for comp_name, factory in result.items():
                    if comp_name in table:
                        first = table[comp_name].plugin
                        raise PluginError(
                            f"{kind} {comp_name!r} is registered by two plugins: {first!r} "
                            f"({self.origins.get(first, '?')}) and {plugin_name!r} "
                            f"({self.origins.get(plugin_name, '?')}). Block one of them "
                            "(MEDTL_BLOCK_PLUGINS or plugins.block in the study file)."
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
        except ConfigError:
            raise
        except TypeError as exc:
            raise UnknownComponentError(f"invalid options for {kind} {name!r}: {exc}") from exc
        except ValueError as exc:
            # Factories reject option values with ValueError; those values come from the study.
            where = _OPTIONS_KEYS.get(kind, "the study file").format(name=name)
            raise ConfigError(f"invalid options for {kind} {name!r}: {exc}. Fix {where}") from exc

    def _lookup(self, kind: str, name: str) -> _Component:
        _check_kind(kind)
        table = self.registry[kind]
        if name in table:
            return table[name]
        raise UnknownComponentError(unknown_component_message(kind, name, sorted(table)))

    def plugin_infos(self) -> list[dict[str, Any]]:
        """Describe every registered plugin and every load failure.

        Each entry has ``name``, ``origin`` (``builtin``, ``entry point``, ``module`` or
        ``registered``), ``distribution`` and ``version`` (``None`` for a plugin that
        no installed distribution ships), ``module``, ``components`` (kind to sorted
        names), ``hooks``, ``status`` (``loaded`` or ``failed``) and, for failures,
        ``error``.
        """
        infos = []
        for name, plugin in self.pm.list_name_plugin():
            contributes: dict[str, list[str]] = {}
            for kind, table in self.registry.items():
                names = sorted(n for n, c in table.items() if c.plugin == name)
                if names:
                    contributes[kind] = names
            hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
            origin = self.origins.get(name, PluginOrigin("registered"))
            infos.append(
                {
                    "name": name,
                    "origin": origin.kind,
                    "distribution": origin.distribution,
                    "version": origin.version,
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
                    "origin": failure.kind,
                    "distribution": failure.distribution,
                    "version": failure.version,
                    "module": "",
                    "components": {},
                    "hooks": [],
                    "status": "failed",
                    "error": failure.error,
                }
            )
        return infos

    def plugin_versions(self) -> dict[str, str]:
        """Return each loaded plugin's origin: distribution and version, or its kind of origin."""
        return {name: str(self.origins.get(name, PluginOrigin("registered"))) for name, _ in self.pm.list_name_plugin()}


class _BrokenHook(Exception):
    def __init__(self, plugin: str, error: BaseException):
        super().__init__(plugin, error)
        self.plugin = plugin
        self.error = error


def unknown_component_message(kind: str, name: str, valid: Sequence[str]) -> str:
    """Describe an unknown component name, with the closest valid name and all valid names."""
    hint = did_you_mean(name, valid)
    return f"unknown {kind} {name!r}.{hint} Valid names: {', '.join(valid) or '(none registered)'}."


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise UnknownComponentError(f"unknown component kind {kind!r}. Valid kinds: {', '.join(KINDS)}.")


_current: PluginHost | None = None

#: Blocked names already warned about as unknown, so that each host built in this
#: process (one per run or stage) does not repeat the warning.
_warned_block_names: set[str] = set()


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
