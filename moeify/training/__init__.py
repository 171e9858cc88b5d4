"""Training a moeify output further: healing a split, continuing an upcycle.

It lives beside conversion, not inside it: a model folder is loaded as a transformers model,
handed with its optimizer and data to one accelerate `Accelerator`, and written back in its own
format through the same staged output as every conversion. No distributed code of our own:
`accelerate launch -m moeify train ...` runs the same loop on many processes.
"""
