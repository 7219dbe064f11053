"""The backend contract: every hook a compute backend implements.

A backend is a pluggy plugin. The built-in ones (reference, cpu, onnx, cuda)
are ordinary plugins registered by ember.plugins.registry; third-party ones
arrive through the entry-point group ``ember.backends``. Each hook except
``ember_backends`` takes the backend's name and returns None when the name is
not its own, so the first non-None answer wins (``firstresult``).

ember.plugins.registry calls probe/plan/load on the plugin that declared the
backend only (a pluggy subset caller), so a faulty third-party plugin cannot
break the built-ins; the None-for-foreign-names rule still holds for anyone
calling the hooks on the whole manager.

Data types exchanged here (BackendSpec, Probe, MemoryPlan, Runner) are
defined in ember.plugins.types.
"""
import pluggy

hookspec = pluggy.HookspecMarker("ember")
hookimpl = pluggy.HookimplMarker("ember")


@hookspec
def ember_backends():
    """Declare the backends this plugin provides.

    :return: list[BackendSpec] — name, priority (higher wins under
        ``--backend auto``) and a one-line description. Not firstresult: the
        answers of all plugins are concatenated.
    """


@hookspec(firstresult=True)
def ember_probe(backend):
    """Can `backend` run on this machine?

    Must be cheap and must not raise for "no": a missing library or device is
    ``Probe(available=False, reason=...)``. (A probe that raises anyway is
    reported as unavailable with its error; ember keeps starting.)

    :param backend: the backend's name.
    :return: Probe (available, reason, devices, isa, memory_bytes), or None if
        `backend` is not this plugin's. firstresult.
    """


@hookspec(firstresult=True)
def ember_plan(backend, config, n_ctx, options):
    """Estimate the memory `backend` needs to run a model, before loading it.

    :param backend: the backend's name.
    :param config: ember.formats.model_config.ModelConfig — hyper-parameters and
        tensor table (types, shapes, byte sizes) of the model.
    :param n_ctx: context length the KV cache is sized for.
    :param options: dict of backend options (e.g. ``kv_type``, ``provider``).
    :return: MemoryPlan (weights, kv_cache, scratch, runtime in bytes; host
        and device), or None if `backend` is not this plugin's. firstresult.
    """


@hookspec(firstresult=True)
def ember_load(backend, gguf, config, n_ctx, threads, options):
    """Load a model into a runner that owns its KV cache.

    :param backend: the backend's name.
    :param gguf: the open ember.formats.gguf.GGUFFile (weights are views of
        its read-only map; the runner may keep references to them).
    :param config: ember.formats.model_config.ModelConfig of that file.
    :param n_ctx: context length; the KV cache is allocated once for it.
    :param threads: compute threads (None: the backend's default).
    :param options: dict of backend options.
    :return: Runner (see ember.plugins.types.Runner): ``prefill(tokens,
        all_logits=False)``, ``decode(token)``, ``reset()``,
        ``truncate(n_past)``, ``n_past``, ``n_ctx``, ``close()``; or None if
        `backend` is not this plugin's. firstresult.
    """
