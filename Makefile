bench:
	scripts/bench.sh

test:
	scripts/test.sh

example:
	scripts/run-example.sh

.PHONY: bench test example
