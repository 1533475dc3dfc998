"""The adaptation methods, each a component behind one protocol (:mod:`segadapt.adapt.methods.base`), listed in
:mod:`segadapt.adapt.methods.components`; their configuration in :mod:`segadapt.adapt.methods.config` (no torch)."""
