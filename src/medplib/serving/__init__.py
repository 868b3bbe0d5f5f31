"""HTTP serving: an OpenAI-compatible chat API with region prompts and masks, a segment endpoint,
and a small local web page. `create_app(predictor, settings)` builds the FastAPI app; `serve()`
runs it with uvicorn. See docs/SERVING.md."""
