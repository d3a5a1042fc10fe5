"""The web UI (`dragondiff ui`, extra `[ui]`): Gradio layout in app.py, its logic in session.py."""
