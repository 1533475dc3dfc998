"""segadapt.adapt: datasets, segmenters, source training, source-free adaptation and evaluation (needs torch)."""
