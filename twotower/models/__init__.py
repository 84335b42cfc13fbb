"""Package data: the bundled model (twotower-tiny), shipped inside the wheel and the image so that
`twotower generate` and `twotower serve` work without --model wherever twotower is installed."""
