// msbnb command line (stub until the commands land).
int main() { return 0; }
