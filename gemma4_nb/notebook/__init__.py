"""The notebook layer: what a user meets in Jupyter.

The copilot (one per kernel), the notebook context it sees, the agent that writes and runs cells,
``%%gemma``, the chat sidebar's comm and the ipywidgets panel. It reaches models through
:mod:`gemma4_nb.backends` and loads the in-kernel one from :mod:`gemma4_nb.runtime`.
"""
