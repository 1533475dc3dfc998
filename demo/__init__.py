"""segadapt demo: a Gradio app over runtime Predictors (no torch)."""
