"""medtl's builtin plugins.

In the repository this is the folder ``plugins/``; it installs as the package
``medtl_plugins``. Each module holds hook implementations only, marked with the
public :data:`medtl.hookimpl`, and the host registers them through the same
``register()`` call that third-party plugins go through.
"""
