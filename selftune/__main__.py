from selftune.cli import console

console()
