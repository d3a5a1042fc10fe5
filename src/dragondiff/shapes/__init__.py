"""The bundled "shapes" model: procedural scenes, the model's architecture, its training and its benchmark."""
