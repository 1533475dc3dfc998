"""Datasets (image folders, video frames), joint transforms, depth providers and the CamVid download.

Submodules are imported explicitly (``adapt.data.datasets``...) so that ``segadapt data`` works without torch.
"""
