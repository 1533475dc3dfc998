"""segadapt runtime: run exported segmenters (ONNX Runtime or TensorRT) on images, video and cameras.

This package must stay importable on a Jetson with Python 3.10, numpy, OpenCV and the system TensorRT only:
it never imports torch, transformers or ``adapt``.
"""
