"""One module per noun: `index` (build, update, info, verify, search), `encoders`, `refiner`, `demo`."""
