"""trainer stage of latentdit."""
