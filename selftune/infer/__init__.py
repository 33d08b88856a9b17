"""Generation: sampling, the generate engine, the static decoder, terminal chat, eval."""
