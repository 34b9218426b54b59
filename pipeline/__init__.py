"""pipeline stage of latentdit."""
