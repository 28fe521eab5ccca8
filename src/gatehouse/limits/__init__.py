"""Traffic control: rate limits per application and grant (in process, or shared through Redis), admission of an
app's requests in flight, and fair sharing of the server between apps."""
