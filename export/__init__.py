"""segadapt.export: the RGB segmenter to ONNX (FP32/FP16/INT8 QDQ), TensorRT engines and Triton repositories."""
