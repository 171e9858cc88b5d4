"""`python -m moeify ...`, which is also how `accelerate launch -m moeify train ...` starts each process."""

from moeify.cli import main

main()
