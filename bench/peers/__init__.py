"""Reference peers for bench/peers.py, each written the way its framework's docs suggest.
Every peer decodes with the project's own preprocessing function and runs the same model file,
so a comparison measures the serving stack alone."""
