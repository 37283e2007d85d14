"""The public API contract (docs/architecture.md): every method exported, the registry, __all__."""

import jmtl

CONTRACT_METHODS = {
    "ew", "weighted", "uw", "gradnorm", "dwa", "rlw", "gls", "si", "famo", "stch", "imtl_l",
    "db_mtl", "mean", "sum", "mgda", "pcgrad", "gradvac", "cagrad", "imtl_g", "imtl",
    "nash_mtl", "aligned_mtl", "upgrad", "dualproj", "config", "fairgrad", "graddrop", "moco",
    "excess_mtl", "trimmed_mean", "krum",
}


def test_every_contract_method_is_registered_and_exported():
    assert CONTRACT_METHODS <= set(jmtl.methods.names())
    for name in jmtl.methods.names():
        assert name in jmtl.__all__, name
        assert getattr(jmtl, name) is jmtl.methods.factory(name)


def test_all_names_resolve():
    for name in jmtl.__all__:
        assert getattr(jmtl, name) is not None


def test_get_returns_what_the_factory_returns():
    assert jmtl.methods.get("cagrad", c=0.4) is jmtl.cagrad(c=0.4)
    assert jmtl.cagrad(c=0.3) is not jmtl.cagrad(c=0.4)
    m = jmtl.methods.get("cagrad", c=0.4)
    assert m.name == "cagrad" and dict(m.hparams)["c"] == 0.4


def test_design_defaults():
    hp = {n: dict(jmtl.methods.get(n).hparams) for n in
          ("gradnorm", "dwa", "cagrad", "nash_mtl", "gradvac", "famo")}
    assert hp["gradnorm"]["alpha"] == 1.5
    assert hp["dwa"]["T"] == 2
    assert hp["cagrad"]["c"] == 0.4
    assert hp["nash_mtl"]["optim_niter"] == 20 and hp["nash_mtl"]["max_norm"] == 1.0
    assert hp["nash_mtl"]["update_weights_every"] == 1
    assert hp["gradvac"]["beta"] == 0.5
    assert hp["famo"]["gamma"] == 1e-3 and hp["famo"]["w_lr"] == 0.025
