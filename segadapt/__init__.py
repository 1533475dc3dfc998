"""segadapt: source-free adaptation of semantic segmenters, export to ONNX/TensorRT, and a torch-free runtime.

One distribution, one import package. The product's four parts keep their folders in the repository and install
as sub-packages (``pyproject.toml`` maps them):

- ``segadapt.adapt`` (``adapt/``): datasets, segmenters, source training, source-free adaptation, evaluation (torch);
- ``segadapt.export`` (``export/``): the RGB segmenter to ONNX, TensorRT engines, Triton repositories;
- ``segadapt.runtime`` (``runtime/``): exported models on images, video and cameras, without torch;
- ``segadapt.demo`` (``demo/``): the Gradio app over runtime predictors, without torch.

Orchestration sits above them, in this folder: the command line (``segadapt.cli``, ``python -m segadapt``) and the
main job (``segadapt.pipeline``). Dependencies point one way: ``export -> adapt``, ``export -> runtime``,
``demo -> runtime``, this floor -> all four, and ``adapt -> runtime``'s two torch-free leaf modules only (the label
set in ``runtime/classes.py``, atomic writes in ``runtime/files.py``); ``adapt`` never imports ``export``, the
predictor or this floor, and ``runtime``/``demo`` never import torch, ``adapt`` or ``export``
(``tests/test_layout.py`` checks it).
"""

__version__ = "0.1.0"
