"""One module per kernel op: its benchmark shapes, inputs and steps, and `run(device)`."""
