"""Online scoring on Ray Serve (`recsys serve`): replicas that load an export, or follow a
folder of exports and swap in each newer one live, behind HTTP with server-side batching."""
