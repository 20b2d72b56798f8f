"""Lightning callbacks: thin glue around the math core."""
