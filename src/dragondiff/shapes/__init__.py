"""The bundled "shapes" model: what loads and runs it (architecture, weights, tokenizer) and its procedural scenes.
Training lives in `dragondiff.train`, the benchmark in `dragondiff.bench`."""
